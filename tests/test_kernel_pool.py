"""Our kernels' own thread pool (kernels/csrc/thread_pool.h): the same parts as at::parallel_for
so the same bits as one thread, the calling thread finishing an op alone when its worker cannot
run, several Python threads calling at once, a forked child, and no AMX needed by the pool."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine.layers.linear import Linear
from engine.layers.linear_kernels import amx_linear_ops, avx512_bf16_ops, can_pack_for_cpu
from kernels import cpu_ops
from tests.helpers import paged_kv

ops = torch.ops.bento_llm
needs_amx_linear = pytest.mark.skipif(amx_linear_ops() is None, reason="no AMX tiles on this machine")
TIMEOUT_S = 60  # a deadlock fails the test instead of hanging the suite
# kernel_pool_stats' fields, in order.
STATS = ("pooled", "serial_busy", "caller_parts", "worker_parts", "worker_sleeps", "wakes", "worker_preempted",
         "worker_moves", "ahead_bytes")


def stats() -> dict[str, int]:
    return dict(zip(STATS, ops.kernel_pool_stats()))


@contextlib.contextmanager
def threads(n: int, spin_us: int | None = None):
    before, spin = torch.get_num_threads(), ops.kernel_pool_spin_us()
    torch.set_num_threads(n)
    if spin_us is not None:
        ops.set_kernel_pool_spin_us(spin_us)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        ops.set_kernel_pool_spin_us(spin)


@contextlib.contextmanager
def workers_held():
    ops.kernel_pool_hold_workers(True)
    try:
        yield
    finally:
        ops.kernel_pool_hold_workers(False)


def in_thread(fn):
    """fn() on a Python thread, its result; fails if it has not returned within TIMEOUT_S."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    assert not t.is_alive(), "the op did not return: the pool deadlocked"
    return out["value"]


def attention_case(gen):
    """A mixed batch (prefill chunks and decodes) big enough to run on both threads."""
    rows = [(300, 700), (1, 1500), (1, 40), (33, 33)]
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in rows], 16, 3, 64, torch.bfloat16)
    cu = torch.tensor([0] + [q for q, _ in rows]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), 9, 64, generator=gen).bfloat16()
    return lambda: cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)


def amx_linear_case(gen, rows):
    weight = torch.randn(1000, 576, generator=gen).bfloat16()  # 1.1 MB: over the one-thread size
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    packed = ops.amx_linear_pack(weight)
    return lambda: ops.amx_linear(x, packed, None, 1000)


def bf16_linear_case(gen, rows):
    """The AVX512-BF16 kernel on the same strips (also on AMX CPUs: it is called directly)."""
    weight = torch.randn(1000, 576, generator=gen).bfloat16()
    bias = torch.randn(1000, generator=gen).bfloat16()
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    packed = ops.amx_linear_pack(weight)
    return lambda: ops.bf16_linear(x, packed, bias, 1000)


def int4_rows_case(gen):
    layer = Linear(576, 1536, bias=False).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1536, 576, generator=gen))
    assert layer.finalize("int4", 32, can_pack_for_cpu(torch.device("cpu"), torch.bfloat16)) == "int4"
    q, x = layer.quantized, torch.randn(1, 576, generator=gen).bfloat16()
    return lambda: ops.int4_mm_rows(x, q.qweight, q.scales, 32, 1536)


def cases(gen):
    """(name, op) pairs of real kernels this CPU runs, each splitting its work over threads."""
    found = [("paged_attention", attention_case(gen)),
             ("rms_norm", lambda x=torch.randn(64, 576, generator=gen).bfloat16(), w=torch.rand(576, generator=gen):
              cpu_ops.rms_norm(x, w, 1e-6))]
    if amx_linear_ops() is not None:
        found += [("amx_linear 1 row", amx_linear_case(gen, 1)), ("amx_linear 40 rows", amx_linear_case(gen, 40)),
                  ("int4_mm_rows", int4_rows_case(gen))]
    if avx512_bf16_ops() is not None:
        found += [("bf16_linear 1 row", bf16_linear_case(gen, 1)), ("bf16_linear 40 rows", bf16_linear_case(gen, 40))]
    return found


@pytest.mark.parametrize("spin_us", [0, 200])
def test_kernels_on_the_pool_give_their_one_thread_bits(gen, spin_us):
    """Each part is the range at::parallel_for gave a thread: the same bits as one thread, with
    workers that sleep after every op (spin 0) and with workers spinning for the next."""
    for name, op in cases(gen):
        with threads(1):
            alone = op()
        with threads(2, spin_us):
            before = stats()
            shared = [op() for _ in range(5)]
            after = stats()
        assert after["pooled"] > before["pooled"], name  # the op did run on the pool
        for out in shared:
            assert torch.equal(out, alone), name


@needs_amx_linear
def test_the_caller_finishes_an_op_alone_while_its_worker_cannot_run(gen):
    """A worker held (as a descheduled one would be: it has seen the op, it cannot claim a part)
    never makes the caller wait: the caller claims the worker's part too, and the op returns."""
    cases_here = [amx_linear_case(gen, 1), int4_rows_case(gen), attention_case(gen)]
    with threads(1):
        alone = [op() for op in cases_here]
    with threads(2, 200):
        cases_here[0]()  # the workers started
        with workers_held():
            before = stats()
            shared = in_thread(lambda: [op() for op in cases_here])
            after = stats()
        assert after["worker_parts"] == before["worker_parts"]
        assert after["pooled"] - before["pooled"] >= 2 and after["caller_parts"] - before["caller_parts"] >= 4
        # Released, the workers take parts again (and the one that saw an op that has ended since
        # claims nothing of it).
        in_thread(lambda: [cases_here[0]() for _ in range(50)])
    for out, want in zip(shared, alone):
        assert torch.equal(out, want)


def test_python_threads_calling_at_once_all_get_their_results(gen):
    """An op while another thread's op holds the pool runs serially on its own thread: 4 threads
    calling kernels at once all finish, each with the one-thread result."""
    here = cases(gen)
    with threads(1):
        alone = [op() for _, op in here]
    with threads(2, 200):
        before = stats()
        results: list[list[torch.Tensor]] = [[] for _ in range(4)]

        def calls(i):
            for _ in range(10):
                results[i].append([op() for _, op in here])

        workers = [threading.Thread(target=calls, args=(i,), daemon=True) for i in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(TIMEOUT_S)
        assert not any(t.is_alive() for t in workers), "a thread's op did not return: the pool deadlocked"
        after = stats()
    for per_thread in results:
        assert len(per_thread) == 10
        for outs in per_thread:
            for (name, _), out, want in zip(here, outs, alone):
                assert torch.equal(out, want), name
    calls_made = 4 * 10 * len(here)
    ran = after["pooled"] - before["pooled"] + after["serial_busy"] - before["serial_busy"]
    assert calls_made <= ran  # every call was pooled or run serially (some ops make two regions)


# Forks in a fresh interpreter: the suite's process has other threads (engines, servers, torch's
# OpenMP workers) whose locks or pools a forked child inherits (its torch.equal hung in libgomp).
_FORK_SCRIPT = """
import os, sys, threading, time
import numpy as np
import torch
from tests.test_kernel_pool import attention_case, stats, threads
as_bits = lambda t: t.view(torch.int16).numpy()
gen = torch.Generator().manual_seed(int(sys.argv[1]))
op = attention_case(gen)
with threads(2, 200):
    want = op()
    before_fork = stats()
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the op ran on its own pool and matched
        code = 1
        try:
            # Compared in numpy: torch's own ops would use OpenMP, whose threads (unlike ours) a
            # forked child cannot restart once the parent has used them.
            same = all(np.array_equal(as_bits(op()), as_bits(want)) for _ in range(2))
            # The child's own worker takes parts (the parent's cannot: it does not exist here, and
            # the caller would run every part alone); it may start after the first ops are done.
            deadline = time.monotonic() + 20  # a loaded machine may start the thread late
            while stats()["worker_parts"] == before_fork["worker_parts"] and time.monotonic() < deadline:
                same = same and np.array_equal(as_bits(op()), as_bits(want))
            code = 0 if same and stats()["worker_parts"] > before_fork["worker_parts"] else 2
        finally:
            os._exit(code)
    wait = threading.Event()
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        wait.wait(0.1)
    os.kill(pid, 9)
    sys.exit("the forked child's op did not return")
"""


@pytest.mark.slow  # a fresh interpreter: torch import and the kernels from the build cache
def test_a_forked_child_starts_its_own_workers(gen):
    """The parent's workers do not exist in a forked child: the child's first op starts new ones
    (an op waiting on the parent's would hang, or never be claimed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seed = str(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, seed], cwd=root, capture_output=True, text=True,
                          timeout=TIMEOUT_S + 120)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])


@contextlib.contextmanager
def read_ahead(on: bool):
    ops.set_kernel_pool_read_ahead(on)
    try:
        yield
    finally:
        ops.set_kernel_pool_read_ahead(True)


def bytes_read_ahead(first, second, want) -> int:
    """Calls first and second in turn (checking their bits) until a worker has read ahead, or 30 s:
    a worker reads ahead while it would spin, and on a loaded machine it may sleep for a while
    instead (its cooldown). -> the bytes it read."""
    before = stats()["ahead_bytes"]
    deadline = time.monotonic() + 30
    while stats()["ahead_bytes"] == before and time.monotonic() < deadline:
        assert [torch.equal(op(), w) for op, w in zip((first, second), want)] == [True, True]
        time.sleep(0.0002)  # the gap a step's other ops leave between two projections
    return stats()["ahead_bytes"] - before


@pytest.mark.skipif(avx512_bf16_ops() is None, reason="no AVX512-BF16 on this machine")
def test_workers_read_the_next_weight_ahead_only_when_on(gen):
    """Two projections called in turn: the pool learns that each is followed by the other, and a
    worker done with its part reads the next one's weight (prefetches: the results are the same
    bits); switched off, it reads nothing."""
    first, second = bf16_linear_case(gen, 1), bf16_linear_case(gen, 1)
    with threads(1):
        want = [first(), second()]
    with threads(2, 200):
        with read_ahead(False):
            before = stats()
            for _ in range(20):
                assert [torch.equal(op(), w) for op, w in zip((first, second), want)] == [True, True]
            assert stats()["ahead_bytes"] == before["ahead_bytes"]
        with read_ahead(True):
            assert bytes_read_ahead(first, second, want) > 0


@pytest.mark.skipif(avx512_bf16_ops() is None, reason="no AVX512-BF16 on this machine")
def test_the_pool_still_learns_new_weights_after_thousands_of_others(gen):
    """The pool's record of which weight follows which is bounded (2048 slots): after 3000 other
    weights have passed through it (a process that reloads models, or a test session), a new pair
    is still learned and read ahead, and no op scans the whole table."""
    width, tiles = 576, 32  # each view: 512 outputs x 576 bfloat16, over the serial threshold (256 KiB)
    big = ops.amx_linear_pack(torch.randn(16 * (3000 + tiles), width, generator=gen).bfloat16())
    x = torch.randn(1, width, generator=gen).bfloat16()
    with threads(2, 200):
        for i in range(3000):  # 3000 weights at distinct addresses, each followed by the next
            ops.bf16_linear(x, big[i : i + tiles], None, 16 * tiles)
        first, second = bf16_linear_case(gen, 1), bf16_linear_case(gen, 1)
        want = [first(), second()]
        assert bytes_read_ahead(first, second, want) > 0


def test_the_spin_budget_is_validated_and_kept():
    spin = ops.kernel_pool_spin_us()
    try:
        ops.set_kernel_pool_spin_us(37)
        assert ops.kernel_pool_spin_us() == 37
        with pytest.raises(RuntimeError, match="us must be >= 0"):
            ops.set_kernel_pool_spin_us(-1)
        with pytest.raises(RuntimeError, match="us must be <= 1000000"):
            ops.set_kernel_pool_spin_us(1_000_001)
        assert ops.kernel_pool_spin_us() == 37
        ops.set_kernel_pool_spin_us(1_000_000)
        assert ops.kernel_pool_spin_us() == 1_000_000
    finally:
        ops.set_kernel_pool_spin_us(spin)

