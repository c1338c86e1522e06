"""The C++ CPU kernels (kernels/cpu_ops.py, the default backend on CPU) against the plain-torch
ops of kernels/reference.py, on random inputs (seed printed; KERNEL_TEST_SEED=<n> replays it).

Unused cache slots and the tails of partial blocks hold NaN, so a kernel that reads past a
context fails. Tolerances: float32 differs from the reference only in summation order and in
exp's last bits; half dtypes compute in float32 and round once, so they stay within about one
unit in the last place of the reference computed in float32 on the same inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.layers.linear_kernels import avx512_bf16_ops
from kernels import cpu_ops, reference
from tests.helpers import NAN, paged_kv

TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (query heads, KV heads, head_dim, block size): MHA, SmolLM2's 9/3 GQA, GQA 8, MQA.
LAYOUTS = [
    pytest.param(4, 4, 64, 16, id="mha-d64"),
    pytest.param(9, 3, 64, 16, id="gqa3-smollm2"),
    pytest.param(16, 2, 96, 32, id="gqa8-d96-bs32"),
    pytest.param(8, 1, 128, 8, id="mqa-d128-bs8"),
]


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


def test_cpu_ops_take_the_reference_arguments():
    for name in cpu_ops.__all__:
        ours = getattr(cpu_ops, name)
        want = list(inspect.signature(getattr(reference, name)).parameters)
        if isinstance(ours, torch._ops.OpOverloadPacket):
            got = [arg.name for arg in ours.default._schema.arguments]
        else:
            got = list(inspect.signature(ours).parameters)
        assert got == want, name


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_fills_the_named_slots_from_fused_qkv_views_and_skips_minus_one(gen, dtype):
    num_tokens, num_heads, kv_heads, head_dim, block_size = 9, 9, 3, 64, 16
    qkv = torch.randn(num_tokens, (num_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    width = kv_heads * head_dim
    key = qkv[:, num_heads * head_dim :][:, :width].view(num_tokens, kv_heads, head_dim)
    value = qkv[:, num_heads * head_dim + width :].view(num_tokens, kv_heads, head_dim)
    slots = torch.randperm(4 * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:3]] = -1
    k_cache = torch.full((4, block_size, kv_heads, head_dim), NAN, dtype=dtype)
    v_cache = torch.full_like(k_cache, NAN)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cpu_ops.write_kv_cache(key, value, k_cache, v_cache, slots)
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache.isnan(), k_ref.isnan()) and (~k_cache.isnan()).sum() == 6 * width
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


def test_write_kv_cache_converts_to_the_cache_dtype(gen):
    key, value = torch.randn(5, 2, 64, generator=gen), torch.randn(5, 2, 64, generator=gen)
    slots = torch.tensor([3, -1, 17, 0, 30])
    k_cache = torch.full((2, 16, 2, 64), NAN, dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, NAN)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cpu_ops.write_kv_cache(key, value, k_cache, v_cache, slots)
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


def test_write_kv_cache_refuses_a_slot_outside_the_cache_and_writes_nothing(gen):
    key = torch.randn(2, 1, 64, generator=gen)
    k_cache, v_cache = torch.zeros(2, 16, 1, 64), torch.zeros(2, 16, 1, 64)
    with pytest.raises(RuntimeError, match="slot 32 is outside the cache"):
        cpu_ops.write_kv_cache(key, key, k_cache, v_cache, torch.tensor([0, 32]))
    assert not k_cache.any() and not v_cache.any()  # slot 0 was not written either
    with pytest.raises(RuntimeError, match="k_cache and v_cache must have one shape"):
        cpu_ops.write_kv_cache(key, key, k_cache, torch.zeros(1, 16, 1, 64), torch.tensor([0, 31]))


# ---------------------------------------------------------------- decode attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,block_size", LAYOUTS)
def test_decode_attention_matches_reference(gen, dtype, num_heads, kv_heads, head_dim, block_size):
    # A full last block, a single token, lengths across several blocks, and a padding row (0).
    ctx = [block_size * 3, 1, int(torch.randint(2, 6 * block_size, (1,), generator=gen)), 5 * block_size - 1, 0]
    k_cache, v_cache, tables, lens = paged_kv(gen, [max(c, 1) for c in ctx], block_size, kv_heads, head_dim, dtype)
    lens[-1] = 0
    # The query is a view into a fused qkv row, as the model passes it.
    qkv = torch.randn(len(ctx), (num_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    query = qkv[:, : num_heads * head_dim].view(len(ctx), num_heads, head_dim)
    scale = head_dim**-0.5
    out = cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, scale)
    want = reference.decode_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    assert_close(out, want, dtype)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # attends to nothing


def test_decode_attention_splits_work_across_threads_with_the_same_result(gen):
    k_cache, v_cache, tables, lens = paged_kv(gen, [70, 3, 129, 16, 200, 1, 33, 64], 16, 3, 64, torch.float32)
    query = torch.randn(8, 9, 64, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
        torch.set_num_threads(max(2, threads))
        many = cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert_close(many, reference.decode_attention(query, k_cache, v_cache, tables, lens, 0.125), torch.float32)


def instruction_counts(*instructions: str) -> dict[str, int]:
    """How often any of `instructions` occurs in each of the built kernels' functions (demangled names)."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    (library,) = [path for path in torch.ops.loaded_libraries if "bento_llm_cpu_ops" in path]
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    counts: dict[str, int] = {}
    function = ""
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line[line.index("<") + 1 : -2]
        elif any(instruction in line.split() for instruction in instructions):
            counts[function] = counts.get(function, 0) + 1
    return counts


def test_decode_attention_keeps_its_prefetches_in_the_build():
    # GCC deleted attention's loops of _mm_prefetch as loops without effect (851624d to 7a512f4),
    # and decode attention read its K/V from memory 1.3-1.6x slower, no test failing.
    counts = instruction_counts("prefetcht2")
    # prefetch_start, in every build (inside a lambda, whose name c++filt leaves mangled).
    assert any("paged_attention_kernel" in function for function in counts), sorted(counts)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        # The score loops: their first window's keys and values, then each pass's part of the next.
        for name in ("row_scores(", "code_scores<signed char>", "code_scores<c10::Float8_e4m3fn>"):
            found = sum(n for function, n in counts.items() if name in function)
            assert found >= 4, f"{found} prefetcht2 in {name}: {counts}"


# Every other kernel loop that asks memory ahead (any hint), by function: the matmuls' few-row and
# many-row loops (bf16_linear's block<>, gemv_ops' dot_block, the int4 / int8 / w8a8 loops, the
# AMX tiles'), the fused SiLU MLP, and the thread pool's read-ahead worker (Pool::Pool's thread).
PREFETCHING_FUNCTIONS = ["Bf16Strips::block<", "F32Strips::block<", "dot_block<", "int4_block_rows<",
                         "dequantize_int4_block<", "int8_block_rows<", "int8_convert_rows<", "int8_column_bias(",
                         "int8_units(", "w8a8_unit_rows<", "block_1xn<", "run_columns(", "silu_mlp_slice(", "Pool::Pool("]


def test_the_other_kernels_keep_their_prefetches_in_the_build():
    # Their prefetch loops survive only as long as GCC can prove them finite (attention's, over
    # uintptr_t, did not): a test, so a rewrite that loses them fails here, not in a benchmark.
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the AVX-512 build's kernels")
    counts = instruction_counts("prefetcht0", "prefetcht1", "prefetcht2", "prefetchnta")
    missing = [name for name in PREFETCHING_FUNCTIONS if not any(name in function for function in counts)]
    assert not missing, f"no prefetch left in {missing}"


def test_decode_attention_refuses_block_tables_that_point_outside_the_cache(gen):
    k_cache, v_cache, tables, lens = paged_kv(gen, [20, 5], 16, 1, 64, torch.float32)
    query = torch.randn(2, 2, 64, generator=gen)
    tables[0, 1] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match=r"block_tables\[0\]\[1\]"):
        cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    lens[1] = 16 * tables.shape[1] + 1
    with pytest.raises(RuntimeError, match="needs more blocks than block_tables holds"):
        cpu_ops.decode_attention(query[1:], k_cache, v_cache, tables[1:], lens[1:], 0.125)


# ---------------------------------------------------------------- paged (prefill) attention
# The kernel's tiles: 192 query rows (tokens x query heads of a KV head), 256 keys; a unit of work
# costlier than 1/16 of the batch splits its keys into partitions of at least 512.


def run_paged(gen, rows, num_heads, kv_heads, head_dim, block_size, dtype):
    """cpu_ops.paged_attention and the float32 reference on one batch of (query tokens, context)."""
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in rows], block_size, kv_heads, head_dim, dtype)
    cu = torch.tensor([0] + [q for q, _ in rows]).cumsum(0).int()
    # The query is a view into a fused qkv row, as the model passes it.
    qkv = torch.randn(int(cu[-1]), (num_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    query = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    scale = head_dim**-0.5
    out = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, scale)
    want = reference.paged_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, cu, scale)
    return out, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,block_size", LAYOUTS)
def test_paged_attention_runs_prefills_chunks_after_cached_context_and_decodes_in_one_batch(
    gen, dtype, num_heads, kv_heads, head_dim, block_size
):
    # A whole prompt crossing query and key tiles and blocks; a decode; a chunk after cached
    # context (as chunked prefill and prefix hits run) ending mid-block; a one-token prompt; a
    # chunk of exactly one key tile after a partial block; another decode.
    rows = [(300, 300), (1, 77), (70, 333), (1, 1), (256, 256 + block_size // 2), (1, 257)]
    out, want = run_paged(gen, rows, num_heads, kv_heads, head_dim, block_size, dtype)
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([(1, 3000)], id="lone-decode"),
        pytest.param([(50, 2050)], id="question-after-cached-document"),
        pytest.param([(1, 2500)] + [(1, 40)] * 7, id="one-long-decode-among-short"),
    ],
)
def test_paged_attention_splits_a_long_context_into_partitions_with_the_same_result(gen, dtype, rows):
    out, want = run_paged(gen, rows, 9, 3, 64, 16, dtype)
    assert_close(out, want, dtype)


def test_decode_attention_of_a_lone_long_sequence_matches_the_reference(gen):
    k_cache, v_cache, tables, lens = paged_kv(gen, [2777], 16, 3, 64, torch.bfloat16)
    query = torch.randn(1, 9, 64, generator=gen).bfloat16()
    out = cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    want = reference.decode_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, 0.125)
    assert_close(out, want, torch.bfloat16)


def test_paged_attention_gives_the_same_bits_on_one_and_two_threads(gen):
    rows = [(400, 900), (1, 2000), (1, 30), (33, 33)]
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in rows], 16, 3, 64, torch.float32)
    cu = torch.tensor([0] + [q for q, _ in rows]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), 9, 64, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)
        torch.set_num_threads(max(2, threads))
        many = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    want = reference.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)
    assert_close(many, want, torch.float32)


def test_paged_attention_refuses_query_lens_that_do_not_fit_the_context(gen):
    k_cache, v_cache, tables, lens = paged_kv(gen, [20, 5], 16, 1, 64, torch.float32)
    query = torch.randn(10, 2, 64, generator=gen)
    with pytest.raises(RuntimeError, match=r"sequence 1 has 6 query tokens but context_lens\[1\] = 5"):
        cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, torch.tensor([0, 4, 10]).int(), 0.125)
    with pytest.raises(RuntimeError, match="cu_query_lens must run from 0 to the number of query tokens"):
        cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, torch.tensor([0, 4, 9]).int(), 0.125)
    with pytest.raises(RuntimeError, match="cu_query_lens must not decrease"):
        cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, torch.tensor([0, 12, 10]).int(), 0.125)


# ---------------------------------------------------------------- variants: sliding window, soft-capping
# Windows of 1 token, inside a block, across blocks and key tiles (256), and past the partition
# size (512), so a split unit's partitions start inside the window.

VARIANT_ROWS = [(300, 300), (1, 77), (70, 333), (1, 1), (1, 3000), (5, 700), (1, 129)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 7, 100, 600, None])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_paged_and_decode_attention_take_a_sliding_window_and_soft_cap(gen, dtype, window, soft_cap):
    if window is None and soft_cap is None:
        pytest.skip("the plain kernel: tested above")
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in VARIANT_ROWS], 16, 3, 64, dtype)
    cu = torch.tensor([0] + [q for q, _ in VARIANT_ROWS]).cumsum(0).int()
    query = (torch.randn(int(cu[-1]), 9, 64, generator=gen) * 3).to(dtype)  # scores reach the cap
    args = (tables, lens, cu, 0.125, window, soft_cap)
    out = cpu_ops.paged_attention(query, k_cache, v_cache, *args)
    assert_close(out, reference.paged_attention(query.float(), k_cache.float(), v_cache.float(), *args), dtype)
    decodes = cu[1:] - 1  # each sequence's last token, as a decode batch
    out = cpu_ops.decode_attention(query[decodes.long()], k_cache, v_cache, tables, lens, 0.125, window, soft_cap)
    want = reference.decode_attention(query[decodes.long()].float(), k_cache.float(), v_cache.float(), tables, lens,
                                      0.125, window, soft_cap)
    assert_close(out, want, dtype)


def test_the_variants_change_the_result_and_bad_values_are_refused(gen):
    k_cache, v_cache, tables, lens = paged_kv(gen, [200], 16, 1, 64, torch.float32)
    query = torch.randn(1, 2, 64, generator=gen) * 3
    plain = cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    assert not torch.allclose(plain, cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125, 50))
    assert not torch.allclose(plain, cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125, None, 1.0))
    with pytest.raises(RuntimeError, match="sliding_window must be at least 1"):
        cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125, 0)
    with pytest.raises(RuntimeError, match="soft_cap must be positive"):
        cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, 0.125, None, -1.0)


# ---------------------------------------------------------------- bfloat16 tile products (AMX)
# With AMX, bfloat16 attention computes Q.K^T and P.V as bfloat16 products with float32 sums, P
# being the softmax weights rounded to bfloat16. The rule the kernel states: each output row is a
# weighted mean of V rows whose weights are off by at most u = 2^-8 (bfloat16's unit roundoff)
# relative, so |out - exact| <= u |exact| (the output's own rounding) + u / (1 - u) max_j |v_j - exact|
# per element, over the keys the row sees. float32 products hold it too, so it is checked everywhere.

BF16_U = 2.0**-8
AMX_ONLY = pytest.mark.skipif(not cpu_ops.bfloat16_tiles_available(), reason="no AMX: float32 tile products")
# A long decode (split into partitions), decodes, chunks after cached context crossing blocks and
# query and key tiles, a one-token prompt.
TILE_ROWS = [(1, 3000), (1, 77), (70, 333), (1, 1), (64, 136), (1, 129)]


@contextlib.contextmanager
def onednn_disabled():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def within_weight_rounding(out, query, k_cache, v_cache, tables, lens, cu, scale):
    """Asserts the rule above against float64 attention on the same bfloat16 inputs."""
    block_size, group = k_cache.shape[1], query.shape[1] // k_cache.shape[2]
    for i, ctx in enumerate(lens.tolist()):
        slots = (tables[i, : -(-ctx // block_size)].long()[:, None] * block_size + torch.arange(block_size)).flatten()
        k, v = (c.flatten(0, 1)[slots[:ctx]].double().repeat_interleave(group, 1) for c in (k_cache, v_cache))
        q = query[cu[i] : cu[i + 1]].double()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        positions = torch.arange(ctx - len(q), ctx)
        sees = torch.arange(ctx)[None, :] <= positions[:, None]  # [q, k]
        exact = torch.einsum("hqk,khd->hqd", scores.masked_fill(~sees, -math.inf).softmax(-1), v)  # [h, q, d]
        # max over the keys a row sees (a prefix: no window here) of |v - exact|
        highest, lowest = v.cummax(0).values[positions], v.cummin(0).values[positions]  # [q, h, d]
        spread = torch.maximum(highest.transpose(0, 1) - exact, exact - lowest.transpose(0, 1))
        bound = BF16_U * exact.abs() + BF16_U / (1 - BF16_U) * spread + 1e-6
        error = (out[cu[i] : cu[i + 1]].double().transpose(0, 1) - exact).abs()
        assert (error <= bound).all(), f"sequence {i}: worst error / bound {(error / bound).max():.3f}"


@pytest.mark.parametrize("num_heads,kv_heads,head_dim", [(9, 3, 64), (16, 2, 96), (4, 2, 80)], ids=str)
def test_bfloat16_attention_is_within_the_rounding_of_its_softmax_weights(gen, num_heads, kv_heads, head_dim):
    # head_dim 96: P.V in two column blocks (64 + 32); 80: K^T packing with a pair count that is
    # not a multiple of 16.
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in TILE_ROWS], 16, kv_heads, head_dim, torch.bfloat16)
    cu = torch.tensor([0] + [q for q, _ in TILE_ROWS]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen).bfloat16()
    out = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, head_dim**-0.5)
    assert not out.isnan().any()
    within_weight_rounding(out, query, k_cache, v_cache, tables, lens, cu.tolist(), head_dim**-0.5)


# Prefill chunks of several query tiles: on AMX their key tiles are packed once per call and KV
# head, shared by the query tiles. A chunk after a long context whose units split into partitions
# and whose query tiles end at different keys of one partial last key tile (3000 = 11 x 256 + 184);
# a chunk of four query tiles; a first chunk crossing key tiles; a decode (packs as it goes).
PREFILL_ROWS = [(70, 3000), (200, 700), (300, 300), (1, 500)]


@pytest.mark.parametrize("num_heads,kv_heads,head_dim", [(9, 3, 64), (16, 2, 96), (4, 2, 80)], ids=str)
def test_bfloat16_prefill_chunks_sharing_packed_key_tiles_are_within_the_rounding(gen, num_heads, kv_heads, head_dim):
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in PREFILL_ROWS], 16, kv_heads, head_dim,
                                              torch.bfloat16)
    cu = torch.tensor([0] + [q for q, _ in PREFILL_ROWS]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen).bfloat16()
    out = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, head_dim**-0.5)
    assert not out.isnan().any()
    within_weight_rounding(out, query, k_cache, v_cache, tables, lens, cu.tolist(), head_dim**-0.5)


# Decodes (and chunks of under 16 query rows) read K and V rows in place, 16 keys at a time,
# value rows in pairs, query rows in passes of up to 8 and head_dim in 32-column steps: contexts
# of 1 token, at and around the 16-key groups, block sizes and key tiles (256), a batch of many
# short sequences whose block tables have unused tails, group sizes that need 1, 2 and 3 passes.
SHORT_CONTEXTS = [1, 2, 15, 16, 17, 31, 32, 33, 255, 256, 257, 513]


# A decode's unit takes as many KV heads as keep it under 16 rows: 3 of 3 (9, 3), 2 of 2 (10, 2),
# then units of 3 and 1 (16, 4), or one head where a group fills the unit (12, 1; 15, 1).
@pytest.mark.parametrize("num_heads,kv_heads,head_dim",
                         [(9, 3, 64), (12, 1, 32), (15, 1, 64), (10, 2, 128), (16, 4, 64)], ids=str)
def test_bfloat16_decodes_of_many_short_sequences_are_within_the_rounding(gen, num_heads, kv_heads, head_dim):
    ctx = SHORT_CONTEXTS + torch.randint(1, 48, (40,), generator=gen).tolist()
    k_cache, v_cache, tables, lens = paged_kv(gen, ctx, 16, kv_heads, head_dim, torch.bfloat16, extra_width=3)
    query = torch.randn(len(ctx), num_heads, head_dim, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, head_dim**-0.5)
        torch.set_num_threads(max(2, threads))
        out = cpu_ops.decode_attention(query, k_cache, v_cache, tables, lens, head_dim**-0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, out)
    assert not out.isnan().any()
    within_weight_rounding(out, query, k_cache, v_cache, tables, lens, list(range(len(ctx) + 1)), head_dim**-0.5)
    # A chunk of a few tokens (rows = tokens x group under 16) is causal within the chunk.
    chunk = 15 // (num_heads // kv_heads) or 1
    cu = torch.tensor([0, chunk, 1, chunk]).cumsum(0).int()
    k_cache, v_cache, tables, lens = paged_kv(gen, [40, 1, 300], 16, kv_heads, head_dim, torch.bfloat16)
    query = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen).bfloat16()
    out = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, head_dim**-0.5)
    within_weight_rounding(out, query, k_cache, v_cache, tables, lens, cu.tolist(), head_dim**-0.5)


@AMX_ONLY
def test_bfloat16_tile_products_run_on_amx_and_torch_backends_mkldnn_switches_them_off(gen):
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in TILE_ROWS], 16, 3, 64, torch.bfloat16)
    cu = torch.tensor([0] + [q for q, _ in TILE_ROWS]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), 9, 64, generator=gen).bfloat16()
    amx = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)
    with onednn_disabled():
        assert not cpu_ops.bfloat16_tiles_available()
        float32 = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)
    assert cpu_ops.bfloat16_tiles_available()
    assert not torch.equal(amx, float32)  # the weights' rounding shows in some outputs' last bit
    for out in (amx, float32):
        within_weight_rounding(out, query, k_cache, v_cache, tables, lens, cu.tolist(), 0.125)


@pytest.mark.slow  # a subprocess: torch import and the kernels from the build cache
def test_without_amx_bfloat16_attention_gives_the_bits_it_gives_with_onednn_off(gen, tmp_path):
    """oneDNN capped below AMX (as on an AVX-512 CPU without it): the same bits as with oneDNN off."""
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in TILE_ROWS], 16, 3, 64, torch.bfloat16)
    cu = torch.tensor([0] + [q for q, _ in TILE_ROWS]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), 9, 64, generator=gen).bfloat16()
    inputs = tmp_path / "inputs.pt"
    torch.save((query, k_cache, v_cache, tables, lens, cu), inputs)
    script = textwrap.dedent(
        f"""
        import torch
        from kernels import cpu_ops
        args = torch.load({str(inputs)!r})
        assert not cpu_ops.bfloat16_tiles_available()
        torch.save(cpu_ops.paged_attention(*args, 0.125), {str(tmp_path / "capped.pt")!r})
        """
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    with onednn_disabled():
        float32 = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)
    assert torch.equal(torch.load(tmp_path / "capped.pt"), float32)


# Without AMX (or with oneDNN off, so that AMX CPUs test them too) the float32 tile products are
# attention_products.h's register blocks (bfloat16 inputs staged to float32, or multiplied as
# pairs on AMD's AVX512-BF16 CPUs; units of under 16 rows of a bfloat16 decode take the
# AVX512-BF16 row products instead): 6 query rows x 64
# columns, the rest in 1..5-row blocks and masked 16-column strips. Rows per sequence from 1 to
# 400 (three query tiles of 192 rows at group 1), keys ending inside a 16- and a 64-key strip,
# head_dim with a 64-column strip and a masked tail (80, 72), query tiles ending on different keys.
EDGE_ROWS = [(16, 16), (17, 301), (64, 64), (191, 449), (193, 707), (400, 513), (6, 35), (1, 100), (3, 50)]


@pytest.mark.parametrize("num_heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 80), (2, 2, 72), (8, 1, 128)], ids=str)
def test_attention_products_without_amx_match_the_reference_at_block_edges(gen, num_heads, kv_heads, head_dim):
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in EDGE_ROWS], 16, kv_heads, head_dim, torch.float32)
    cu = torch.tensor([0] + [q for q, _ in EDGE_ROWS]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen) * 2  # scores of a few units: peaked rows
    scale = head_dim**-0.5
    with onednn_disabled():
        out = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, scale)
        assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, lens, cu, scale), torch.float32)
        q16, k16, v16 = query.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16()
        out = cpu_ops.paged_attention(q16, k16, v16, tables, lens, cu, scale)
    assert not out.isnan().any()
    within_weight_rounding(out, q16, k16, v16, tables, lens, cu.tolist(), scale)


# On AMD's CPUs with AVX512-BF16 and no AMX (cpu_features.h's rule: bfloat16_pairs_available),
# bfloat16 attention's tile products run on attention_products.h's pair blocks: the tests above
# check attention through them there. Here the blocks alone, on any CPU with AVX512-BF16 (AMX
# ones, where attention never takes them, included): 6-row blocks and the 1..5 rows left, 64-column
# strips and masked 16-column tails, one pair of depth and more. Each product of two bfloat16
# values is exact in float32, so only the float32 sums round: k of them, each within float32's
# unit roundoff of its partial sum.
needs_avx512_bf16 = pytest.mark.skipif(avx512_bf16_ops() is None, reason="no AVX512-BF16")


@needs_avx512_bf16
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 257])
def test_bfloat16_pair_products_are_exact_products_summed_in_float32(gen, rows):
    for depth, columns in [(2, 1), (64, 256), (80, 17), (128, 100), (36, 64), (6, 65)]:
        a = torch.randn(rows, depth, generator=gen).bfloat16()
        b = torch.randn(depth, columns, generator=gen).bfloat16()
        out = cpu_ops.bfloat16_pair_product(a, b)
        exact = a.double() @ b.double()
        bound = depth * 2.0**-24 * (a.double().abs() @ b.double().abs())
        assert out.dtype == torch.float32 and out.shape == (rows, columns)
        assert ((out.double() - exact).abs() <= bound).all(), (depth, columns)


PAIRS_HERE = pytest.mark.skipif(not cpu_ops.bfloat16_pairs_available() or cpu_ops.bfloat16_tiles_available(),
                                reason="bfloat16 attention's tiles are AMX or float32 products here")


@PAIRS_HERE
@pytest.mark.parametrize("num_seqs", [1, 3, 16, 64])
@pytest.mark.parametrize("num_heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 96), (4, 2, 80)], ids=str)
def test_bfloat16_attention_on_pair_products_matches_the_reference(gen, num_seqs, num_heads, kv_heads, head_dim):
    """Prefill chunks (and a few decodes) over contexts of odd lengths, block tables with unused
    tails over NaN slots, through the pair blocks: within the weights' rounding, and the reference."""
    q_lens = torch.randint(1, 90, (num_seqs,), generator=gen).tolist()
    ctx = [q + int(torch.randint(0, 300, (1,), generator=gen)) for q in q_lens]
    k_cache, v_cache, tables, lens = paged_kv(gen, ctx, 16, kv_heads, head_dim, torch.bfloat16, extra_width=2)
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    query = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen).bfloat16()
    scale = head_dim**-0.5
    out = cpu_ops.paged_attention(query, k_cache, v_cache, tables, lens, cu, scale)
    assert not out.isnan().any()
    within_weight_rounding(out, query, k_cache, v_cache, tables, lens, cu.tolist(), scale)
    assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, lens, cu, scale), torch.bfloat16)


def check_an_avx2_build(gen, tmp_path, root, env: dict[str, str]) -> None:
    """ATEN_CPU_CAPABILITY=avx2 builds the extension with -march=x86-64-v3, as on an AVX2-only CPU
    (CI may get one): every source must compile there (AVX-512 code only inside functions that
    carry their own target attribute), and attention equals the reference. A source that did not
    build used to drop the whole C++ backend to torch, silently.

    Run in `root` (whose kernels/ it imports) with `env` (its TORCH_EXTENSIONS_DIR). Called by
    tests/test_server_default_model.py::test_bentoml_build_packs_the_default_model_and_the_bento_serves
    on the Bento it serves for an AVX2-only CPU: one AVX2 compile (~40 s on CI) then checks both
    that the Bento's copy of the kernels builds and this."""
    k_cache, v_cache, tables, lens = paged_kv(gen, [400, 7], 16, 3, 64, torch.float32)  # 400: over one thread's share
    cu = torch.tensor([0, 5, 1]).cumsum(0).int()
    query = torch.randn(int(cu[-1]), 9, 64, generator=gen)
    inputs = tmp_path / "inputs.pt"
    torch.save((query, k_cache, v_cache, tables, lens, cu), inputs)
    script = textwrap.dedent(
        f"""
        import torch
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"
        from kernels import cpu_ops
        assert cpu_ops.__file__.startswith({str(root)!r}), cpu_ops.__file__
        args = torch.load({str(inputs)!r})
        torch.set_num_threads(2)  # on our kernels' thread pool (no AMX in it)
        torch.save(cpu_ops.paged_attention(*args, 0.125), {str(tmp_path / "avx2.pt")!r})
        assert torch.ops.bento_llm.kernel_pool_stats()[0] > 0
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=dict(env, ATEN_CPU_CAPABILITY="avx2"), cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = reference.paged_attention(query, k_cache, v_cache, tables, lens, cu, 0.125)
    assert_close(torch.load(tmp_path / "avx2.pt"), expected, torch.float32)


# ---------------------------------------------------------------- the model's pointwise ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 300])  # a decode, a decode batch, a prefill (threaded)
def test_rms_norm_and_the_fused_residual_add(gen, dtype, rows):
    x = (torch.randn(rows, 2 * 576, generator=gen) * 3).to(dtype)[:, 576:]  # strided rows
    weight = torch.rand(576, generator=gen) + 0.5
    assert_close(cpu_ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dtype)

    residual = torch.randn(rows, 576, generator=gen).to(dtype)
    ours, theirs = residual.clone(), residual.clone()
    out = cpu_ops.add_rms_norm(ours, x, weight, 1e-5)
    want = reference.add_rms_norm(theirs, x, weight, 1e-5)
    assert torch.equal(ours, theirs)  # the sum, rounded to the dtype, is left in residual
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_silu_mul(gen, dtype, rows):
    gate_up = torch.randn(rows, 2 * 1536, generator=gen) * 4
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -20.0, -1e-6, 0.0, 1e-6, 90.0, 200.0])  # saturated and tiny
    gate_up = gate_up.to(dtype)
    assert_close(cpu_ops.silu_mul(gate_up), reference.silu_mul(gate_up.float()), dtype)


def test_silu_mul_refuses_gate_up_of_other_ranks_or_an_odd_width(gen):
    with pytest.raises(RuntimeError, match="gate_up must have 2 dimensions, got 1"):
        cpu_ops.silu_mul(torch.randn(8, generator=gen))
    with pytest.raises(RuntimeError, match="gate_up must have an even number of columns"):
        cpu_ops.silu_mul(torch.randn(2, 7, generator=gen))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 15, 16, 17, 1536 + 9])  # the vector loop's 16 lanes, and their tails
def test_silu_mul_of_any_width_on_strided_rows_rounds_once(gen, dtype, width):
    """float32 within a few units in the last place of torch's SiLU (the exp and the reciprocal are
    polynomial and Newton-refined, not correctly rounded); half dtypes: the float32 value rounded
    once, so at most one unit in the last place from the reference rounded to the dtype."""
    wide = torch.randn(37, 2 * width + 5, generator=gen) * 6
    specials = torch.tensor([-200.0, -90.0, -1e-6, 0.0, 90.0, 200.0])[:width]  # saturated and tiny gates
    wide[0, 5 : 5 + len(specials)] = specials
    gate_up = wide.to(dtype)[:, 5:]  # rows 2 * width + 5 apart
    out = cpu_ops.silu_mul(gate_up)
    expected = reference.silu_mul(gate_up.float())
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=4e-6)
    else:
        # Absolute slack: the dtype's subnormal spacing, and 1e-30 for a gate below about -80, whose
        # exp saturates (e^80 or 2^120): g * u / e^80 for about 0.
        info = torch.finfo(dtype)
        slack = info.eps * expected.abs() + info.smallest_normal * info.eps + 1e-30
        assert ((out.float() - expected).abs() <= slack).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_rotates_q_and_k_in_place_in_the_fused_projection(gen, dtype):
    from engine.models.llama import ModelConfig, RotaryEmbedding

    tokens, num_heads, kv_heads, head_dim = 7, 9, 3, 64
    config = ModelConfig(
        model_type="llama", vocab_size=8, hidden_size=num_heads * head_dim, intermediate_size=8, num_layers=1,
        num_heads=num_heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
        max_position_embeddings=512, tie_word_embeddings=False, attention_bias=False, o_proj_bias=False,
        mlp_bias=False, inv_freq=1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)),
        rope_attention_scaling=1.0, eos_token_ids=[], sliding_window=None,
    )
    rope = RotaryEmbedding(config, 512).table(torch.randint(0, 512, (tokens,), generator=gen), dtype)
    qkv = torch.randn(tokens, (num_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    ours, theirs = qkv.clone(), qkv.float()
    rotated = (num_heads + kv_heads) * head_dim
    cpu_ops.rotary_embedding_(ours[:, :rotated].view(tokens, -1, head_dim), *rope)
    reference.rotary_embedding_(theirs[:, :rotated].view(tokens, -1, head_dim), *(t.float() for t in rope))
    assert_close(ours, theirs, dtype)
    assert torch.equal(ours[:, rotated:], qkv[:, rotated:])  # v untouched
    assert not torch.equal(ours[:, :rotated], qkv[:, :rotated])


# ---------------------------------------------------------------- building


def test_without_a_compiler_auto_falls_back_to_torch_and_cpu_is_refused(tmp_path):
    """A machine that cannot build the kernels (no C++ compiler here) still serves, through the
    plain-torch backend, and says why; asking for "cpu" by name is a clear error."""
    script = textwrap.dedent(
        """
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from engine.attention import AttentionBackend
        caches = [torch.zeros(2, 16, 1, 64)]
        print("auto ->", AttentionBackend("auto", caches, caches).name)
        try:
            AttentionBackend("cpu", caches, caches)
        except ValueError as e:
            print("cpu ->", e)
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "auto -> torch" in done.stdout
    assert "using the plain-torch backend" in done.stderr and "could not be built" in done.stderr
    assert "cpu -> attention_backend='cpu' is unavailable here" in done.stdout


# ---------------------------------------------------------------- greedy sampling


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 257])
def test_argmax_rows_is_torch_argmax_with_ties_nan_infinities_and_strided_rows(gen, dtype, rows):
    """The first of equal maxima, the first NaN of a row that has one, index 0 for a row of -inf,
    +inf wins; a vocabulary that is not a multiple of the kernel's 32 lanes; strided rows (a
    view that drops the first column)."""
    vocab = 1000 + 7
    logits = torch.randn(rows, vocab + 1, generator=gen).to(dtype)
    cols = torch.randint(0, vocab + 1, (rows, 3), generator=gen)
    for r in range(rows):  # a tie for the maximum at three random places (often in different lanes)
        logits[r, cols[r]] = logits[r].max() + 1
    if rows > 1:
        logits[1, 900] = float("nan")
        logits[1, 40] = float("nan")
    if rows > 2:
        logits[2] = float("-inf")
        logits[-1, 500] = float("inf")
    for view in (logits, logits[:, 1:]):
        assert torch.equal(cpu_ops.argmax_rows(view), torch.argmax(view, dim=-1))
        assert torch.equal(reference.argmax_rows(view), torch.argmax(view, dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 257])
def test_int8_quad_rows_is_the_gathered_codes_times_their_scales(gen, dtype, rows):
    """A tied embedding's lookup in the LM head's int8 codes ([N/64][K/4][64][4], rows padded to 64
    and K past in_features): each code times its row's scale, rounded once to the scales' dtype,
    bit for bit the torch ops' gather (engine/layers/packed_weight.py); 257 rows of 570 split over the pool."""
    n, k, padded = 200, 570, 576
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, generator=gen) * 0.02 + 1e-3).to(dtype)
    layout = torch.nn.functional.pad(torch.cat([codes, codes.new_ones(256 - n, k)]), (0, padded - k), value=1)
    layout = layout.reshape(-1, 64, padded // 4, 4).transpose(1, 2).contiguous()
    index = torch.randint(0, n, (rows,), generator=gen)
    index[0] = n - 1  # the last row of a partly filled block of 64
    want = codes[index].to(dtype) * scales[index, None]
    got = torch.ops.bento_llm.int8_quad_rows(layout, scales, index, k)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(torch.ops.bento_llm.int8_quad_rows(layout, scales, index.int(), k), want)  # int32 ids as torch's
    with pytest.raises(RuntimeError, match="scales must be float32, bfloat16 or float16"):
        torch.ops.bento_llm.int8_quad_rows(layout, scales.double(), index, k)
    with pytest.raises(RuntimeError, match="index 200 is out of range for 200 rows"):
        torch.ops.bento_llm.int8_quad_rows(layout, scales, torch.tensor([0, n]), k)
    with pytest.raises(RuntimeError, match="in_features must be in 1..576"):
        torch.ops.bento_llm.int8_quad_rows(layout, scales, index, padded + 4)


@pytest.mark.parametrize("block", [2, 32, 64])
@pytest.mark.parametrize("rows", [1, 64, 257])
def test_int8_quad_rows_rotates_w8a8s_rows_back(gen, block, rows):
    """w8a8's tied table holds codes of W R: its lookup returns each row times R (rotation.py's
    rotate, R its own inverse) in float32, as the codes times their scales rotated by torch."""
    from engine.layers.rotation import rotate

    n, k = 200, 576
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen) * 0.02 + 1e-3
    layout = torch.cat([codes, codes.new_ones(256 - n, k)]).reshape(-1, 64, k // 4, 4).transpose(1, 2).contiguous()
    index = torch.randint(0, n, (rows,), generator=gen)
    want = rotate(codes[index].float() * scales[index, None], block)
    got = torch.ops.bento_llm.int8_quad_rows(layout, scales, index, k, block)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, codes[index].float() * scales[index, None], atol=1e-3)  # (it did rotate)
    for bad in (3, 1, 1024):
        with pytest.raises(RuntimeError, match="rotation_block must be 0 or a power of two dividing in_features 576"):
            torch.ops.bento_llm.int8_quad_rows(layout, scales, index, k, bad)


def test_argmax_rows_gives_the_same_indices_on_one_and_two_threads(gen):
    logits = torch.randn(64, 49152, generator=gen).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.argmax_rows(logits)
        torch.set_num_threads(2)
        assert torch.equal(cpu_ops.argmax_rows(logits), one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, logits.float().argmax(dim=-1))
