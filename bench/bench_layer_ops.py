"""A decode layer's small ops (everything but the projections' matmuls) called directly in a loop,
on SmolLM2-135M's shapes (hidden 576, 9 heads over 3 KV heads of 64, intermediate 1536, bfloat16):
the time per call of decoder_layer with its projections' matmuls stood in for by aten::new_zeros
(as bench/profile_step.py's "without the projections' matmuls" does), of the stand-ins alone, and
of each op the layer calls (add_rms_norm, qkv_attention, decode_attention, write_kv_cache,
rotary_embedding_, silu_mul), at 1, 4 and 16 decode rows.

    python bench/bench_layer_ops.py                              # this tree's ops
    python bench/bench_layer_ops.py --before-tree /tmp/base      # A/B against another checkout, one process
    python bench/bench_layer_ops.py --rows 1 --rounds 9 --calls 4000

--before-tree DIR: that tree's cpu_ops.cpp, step_ops.cpp and thread_pool.cpp (and headers) built
beside this one's with the op namespace renamed (bench_kv_cache.py's load_before), every
op timed through both, alternating round by round in this process; the "new/old" column is the
ratio of the medians. Each number is the median over --rounds rounds of --calls calls (a call's
mean within a round), every round printed for the layer op; a Python-level call costs ~1-2 us of
its own on top of the op (the same for both trees).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, DIM, BLOCK, EPS = 576, 1536, 9, 3, 64, 16, 1e-5
def layer_inputs(rows: int, gen: torch.Generator) -> dict:
    """One decode step's inputs for `rows` sequences at contexts 10, 17, 24, ... (the new token's
    slot included), in a paged cache of shuffled blocks."""
    lens = [10 + 7 * i for i in range(rows)]
    per_seq = [(c + BLOCK - 1) // BLOCK for c in lens]
    num_blocks = sum(per_seq) + 4
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(rows, max(per_seq), dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[used: used + n].int()
        used += n
    shape = (num_blocks, BLOCK, KV_HEADS, DIM)
    k_cache = torch.randn(shape, generator=gen).bfloat16()
    v_cache = torch.randn(shape, generator=gen).bfloat16()
    slots = torch.tensor([int(tables[i, (c - 1) // BLOCK]) * BLOCK + (c - 1) % BLOCK for i, c in enumerate(lens)])
    angles = torch.tensor([c - 1 for c in lens], dtype=torch.float)[:, None] * 10000 ** (-torch.arange(0, DIM, 2) / DIM)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :].bfloat16()
    sin = torch.cat([-angles.sin(), angles.sin()], -1)[:, None, :].bfloat16()
    width = (HEADS + 2 * KV_HEADS) * DIM
    return dict(
        residual=torch.randn(rows, HIDDEN, generator=gen).bfloat16(), x=torch.randn(rows, HIDDEN, generator=gen).bfloat16(),
        qkv=torch.randn(rows, width, generator=gen).bfloat16(), gate_up=torch.randn(rows, 2 * INTERMEDIATE, generator=gen).bfloat16(),
        cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, slots=slots, tables=tables, lens=torch.tensor(lens, dtype=torch.int32),
        norm=torch.rand(HIDDEN, generator=gen) + 0.5,
        # decoder_layer's projections: aten::new_zeros of each output's shape (an int list: its length, then its sizes)
        names=["aten::new_zeros"] * 4,
        ints=[i for n in (width, HIDDEN, 2 * INTERMEDIATE, HIDDEN) for i in (2, rows, n)],
    )


def op_calls(ops, a: dict) -> dict:
    """name -> a call of that op on a's inputs (in-place ops on a's tensors: timing only)."""
    q = a["qkv"][:, : HEADS * DIM].view(-1, HEADS, DIM)
    qk = a["qkv"][:, : (HEADS + KV_HEADS) * DIM].view(-1, HEADS + KV_HEADS, DIM)
    k = a["qkv"][:, (HEADS) * DIM: (HEADS + KV_HEADS) * DIM].view(-1, KV_HEADS, DIM)
    v = a["qkv"][:, (HEADS + KV_HEADS) * DIM:].view(-1, KV_HEADS, DIM)
    scale = DIM ** -0.5
    return {
        "decoder_layer (new_zeros projections)": lambda: ops.decoder_layer(
            a["residual"], a["x"], a["cos"], a["sin"], a["k_cache"], a["v_cache"], a["slots"], a["tables"], a["lens"], None,
            a["norm"], a["norm"], EPS, a["names"], [], a["ints"], HEADS, scale),
        "add_rms_norm": lambda: ops.add_rms_norm(a["residual"], a["x"], a["norm"], EPS),
        "qkv_attention": lambda: ops.qkv_attention(a["qkv"], a["cos"], a["sin"], a["k_cache"], a["v_cache"], a["slots"],
                                                   a["tables"], a["lens"], None, HEADS, scale),
        "decode_attention": lambda: ops.decode_attention(q, a["k_cache"], a["v_cache"], a["tables"], a["lens"], scale),
        "write_kv_cache": lambda: ops.write_kv_cache(k, v, a["k_cache"], a["v_cache"], a["slots"]),
        "rotary_embedding_": lambda: ops.rotary_embedding_(qk, a["cos"], a["sin"]),
        "silu_mul": lambda: ops.silu_mul(a["gate_up"]),
    }


def stand_ins(a: dict, rows: int) -> dict:
    """The layer op's four new_zeros alone, from Python (what decoder_layer's time includes for them, plus Python's call)."""
    x = a["x"]
    shapes = [(rows, n) for n in ((HEADS + 2 * KV_HEADS) * DIM, HIDDEN, 2 * INTERMEDIATE, HIDDEN)]
    return {"(the four new_zeros stand-ins, from Python)": lambda: [x.new_zeros(s) for s in shapes]}


def timed_round(call, calls: int) -> tuple[float, float]:
    """Mean microseconds per call over `calls` calls: wall time, and this thread's CPU time (on a
    loaded machine the steadier: it leaves out time the thread waited for a core; a call that runs
    on the pool's workers too is undercounted by their share)."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6, (time.thread_time() - start_cpu) / calls * 1e6


@torch.inference_mode()  # as the engine's forward (engine/model_runner.py): no autograd views
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before-tree", default=None, help="a checkout whose ops to time beside this one's")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import kernels.cpu_ops  # noqa: F401  (this tree's ops)

    trees = {"new": torch.ops.bento_llm}
    if args.before_tree:
        from bench.bench_kv_cache import BEFORE_NAMESPACE, load_before

        load_before(args.before_tree, ("cpu_ops.cpp", "step_ops.cpp", "thread_pool.cpp"))
        trees["old"] = getattr(torch.ops, BEFORE_NAMESPACE)
    print(f"load {open('/proc/loadavg').read().split()[:3]}, {args.threads} threads, `python bench/bench_layer_ops.py "
          f"{' '.join(sys.argv[1:])}`")
    for rows in args.rows:
        inputs = {t: layer_inputs(rows, torch.Generator().manual_seed(rows)) for t in trees}
        cases = {t: {**op_calls(ops, inputs[t]), **stand_ins(inputs[t], rows)} for t, ops in trees.items()}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in cases["new"]:
                for t in order:
                    call = cases[t][name]
                    call()  # warm
                    times.setdefault((t, name), []).append(timed_round(call, args.calls))
        print(f"\nrows {rows}: us per call, median of {args.rounds} rounds of {args.calls} calls: wall | this thread's CPU")
        header = "| op | " + " | ".join(f"{t} wall | {t} CPU" for t in trees) + (" | new/old wall | new/old CPU |" if "old" in trees else " |")
        print(header)
        print("|" + " --- |" * (header.count("|") - 1))
        for name in cases["new"]:
            meds = {t: [statistics.median(x[k] for x in times[(t, name)]) for k in (0, 1)] for t in trees}
            ratio = f" | {meds['new'][0] / meds['old'][0]:.2f} | {meds['new'][1] / meds['old'][1]:.2f}" if "old" in trees else ""
            print(f"| {name} | " + " | ".join(f"{meds[t][0]:.2f} | {meds[t][1]:.2f}" for t in trees) + ratio + " |")
        layer = "decoder_layer (new_zeros projections)"
        for t in trees:
            print(f"{t} decoder_layer, every round (wall/CPU): {' '.join(f'{w:.1f}/{c:.1f}' for w, c in times[(t, layer)])}")
    print(f"load after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
