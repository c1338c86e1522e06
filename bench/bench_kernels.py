"""Decode-attention benchmark: the Triton paged kernel against the card's copy bandwidth and against
PyTorch's scaled_dot_product_attention on the same K/V gathered contiguous.

    python bench/bench_kernels.py                      # batch 1..256 x context 512..32k, fp16
    python bench/bench_kernels.py --batch-sizes 1 8 --context-lens 4096 --json bench/results.json

Decode is memory bound, so the figure of merit is achieved bandwidth: bytes of K, V and Q read
over the kernel time, next to a device-to-device copy's (read + write) bandwidth. SDPA gets the
group trick (the G query heads of a KV head become G query rows), so it reads K and V once, like
the paged kernel, but from contiguous memory and without the block-table indirection.
Needs a CUDA device; it refuses to run without one.

    python bench/bench_kernels.py --cpu                 # the C++ kernel: batch 1/16/64 x context 64/256/1024
    python bench/bench_kernels.py --cpu --baseline HEAD~3   # A/B against cpu_ops.cpp at a git revision

With --cpu: the C++ decode attention (kernels/cpu_ops.py) on SmolLM2-135M's shape (9/3 heads,
head_dim 64, bfloat16), one call per layer over --layers layers' caches in turn as a decode step
makes them (so the K/V come from wherever a step finds them, not from a cache warmed by the call
before), against reading those K/V bytes at the memory read bandwidth measured in the same run
(bench/bench_limits.py's). --baseline builds kernels/csrc/cpu_ops.cpp as it was at a revision
under another op namespace and times both in the same process, alternating calls.

    python bench/bench_kernels.py --cpu-prefill --baseline HEAD~1   # a 2,000-token prompt's kernels

With --cpu-prefill: the kernels of one layer of a prefill of --prompt-len tokens at SmolLM2's shape
(hidden 576, intermediate 1536, 9/3 heads, head_dim 64) in bfloat16 and float32: silu_mul,
rms_norm, add_rms_norm, rotary and the paged prefill attention (causal, one sequence), each next to
its limit: the elementwise ops against moving their bytes at the memory copy speed measured in the
same run (a copy of the input into a mapped buffer), attention against its causal FLOPs at --attention-gflops. With
--baseline, both builds' calls alternate and the table shows each and new/baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # real Triton kernels only: must be set before kernels/ is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the C++ CPU kernel instead (defaults: SmolLM2's shape)")
    p.add_argument("--baseline", metavar="REV", help="--cpu: A/B against kernels/csrc/cpu_ops.cpp at this git revision")
    p.add_argument("--layers", type=int, default=30, help="--cpu: caches called in turn, one per layer")
    p.add_argument("--cpu-prefill", action="store_true", help="one prefill layer's C++ kernels (see above)")
    p.add_argument("--prompt-len", type=int, default=2000, help="--cpu-prefill: the prompt's tokens")
    p.add_argument("--repeats", type=int, default=10, help="--cpu-prefill: timed calls of each kernel")
    p.add_argument("--attention-gflops", type=float, default=400.0,
                   help="--cpu-prefill: the matmul throughput attention's limit assumes (bench_limits.py measures "
                        "the projections' at the prompt's rows)")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--context-lens", type=int, nargs="+")
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--block-size", type=int, default=16, choices=[16, 32])
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--max-kv-gib", type=float, default=16.0,
                   help="skip shapes whose K+V cache exceeds this (SDPA needs a second, gathered copy)")
    p.add_argument("--no-sdpa", action="store_true", help="time the Triton kernel only")
    p.add_argument("--rep-ms", type=int, default=200, help="time budget per measurement")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    defaults = (dict(batch_sizes=[1, 16, 64], context_lens=[64, 256, 1024], num_heads=9, num_kv_heads=3, head_dim=64,
                     dtype="bf16") if args.cpu else
                dict(batch_sizes=[1, 4, 16, 64, 256], context_lens=[512, 2048, 8192, 32768], num_heads=32,
                     num_kv_heads=8, head_dim=128, dtype="fp16"))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.baseline and not (args.cpu or args.cpu_prefill):
        p.error("--baseline needs --cpu or --cpu-prefill")
    if args.num_heads % args.num_kv_heads:
        p.error("--num-heads must be a multiple of --num-kv-heads")
    return args


def bench_ms(fn, rep_ms: int) -> float:
    import triton.testing

    # do_bench clears L2 between runs: small caches would otherwise be timed from L2, not HBM.
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth(rep_ms: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms)
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3)


def run_case(args: argparse.Namespace, batch: int, ctx: int, copy_bw: float) -> dict | None:
    from kernels import triton_attention, triton_ops

    dtype, bs = DTYPES[args.dtype], args.block_size
    h, kvh, d = args.num_heads, args.num_kv_heads, args.head_dim
    elt = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * batch * ctx * kvh * d * elt
    if kv_bytes > args.max_kv_gib * (1 << 30):
        return None
    blocks_per_seq = math.ceil(ctx / bs)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, bs, kvh, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    # Shuffled physical blocks, as a long-running server's free list hands them out.
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int64).view(batch, blocks_per_seq).int()
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, h, d, device="cuda", dtype=dtype)
    scale = d**-0.5

    def paged():
        return triton_ops.decode_attention(query, k_cache, v_cache, tables, context_lens, scale)

    out = paged()
    ms = bench_ms(paged, args.rep_ms)
    read = kv_bytes + query.numel() * elt
    segments = triton_attention._pick_segments(batch * kvh, blocks_per_seq * bs, query.device)
    row = dict(batch=batch, context=ctx, segments=segments, triton_ms=ms,
               triton_gbs=read / (ms * 1e-3) / 1e9, triton_pct_copy=100 * read / (ms * 1e-3) / copy_bw)

    if not args.no_sdpa:
        # Gathered contiguous: [batch, kvh, ctx, d]. The query's G heads per KV head become G rows.
        k = k_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
        v = v_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
        del k_cache, v_cache
        q = query.view(batch, kvh, h // kvh, d)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        ref = sdpa().reshape(batch, h, d)
        row["max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
        sdpa_ms = bench_ms(sdpa, args.rep_ms)
        row.update(sdpa_ms=sdpa_ms, sdpa_gbs=read / (sdpa_ms * 1e-3) / 1e9, speedup_vs_sdpa=sdpa_ms / ms)
    return row


def baseline_decode_attention(rev: str):
    """decode_attention of kernels/csrc/cpu_ops.cpp at git revision rev (see baseline_ops)."""
    return baseline_ops(rev).decode_attention


def baseline_ops(rev: str):
    """kernels/csrc at git revision rev, built beside this tree's with its ops and thread pool renamed
    (bench_kv_cache.load_before: cpu_ops.cpp alone no longer links without thread_pool.cpp), its
    ops under torch.ops.bento_llm_before."""
    from bench.bench_kv_cache import BEFORE_NAMESPACE, load_before

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = tempfile.mkdtemp()
    archive = subprocess.run(["git", "archive", rev, "kernels/csrc"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    load_before(tree)
    return getattr(torch.ops, BEFORE_NAMESPACE)


def prefill_cases(tokens: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """name -> (call(ops) running one kernel of a prefill layer, seconds of its limit)."""
    hidden, inter, h, kvh, d, bs = 576, 1536, 9, 3, 64, 16
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = torch.rand(hidden, generator=gen) + 0.5
    gate_up = (torch.randn(tokens, 2 * inter, generator=gen) * 3).to(dtype)
    qkv = torch.randn(tokens, h + 2 * kvh, d, generator=gen).to(dtype)
    angles = torch.rand(tokens, 1, d, generator=gen)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    blocks = -(-tokens // bs) + 1
    k_cache = torch.randn(blocks, bs, kvh, d, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, bs, kvh, d, generator=gen).to(dtype)
    table = torch.randperm(blocks, generator=gen).int()[None]
    lens, cu = torch.tensor([tokens], dtype=torch.int32), torch.tensor([0, tokens], dtype=torch.int32)
    query = qkv[:, :h]
    # Elementwise ops move bytes: their limit is that many bytes at a copy's speed (read + write,
    # into memory already mapped: a fresh tensor's page faults cost more than the copy).
    size, copy = x.element_size(), torch.empty_like(gate_up)
    copy_speed = 2 * gate_up.numel() * size / statistics.median(timeit(lambda: copy.copy_(gate_up), 5))
    attention_flops = 4 * h * d * tokens * tokens / 2
    return {
        "silu_mul": (lambda ops: ops.silu_mul(gate_up), (gate_up.numel() * 3 // 2) * size / copy_speed),
        "rms_norm": (lambda ops: ops.rms_norm(x, weight, 1e-5), 2 * x.numel() * size / copy_speed),
        "add_rms_norm": (lambda ops: ops.add_rms_norm(residual, x, weight, 1e-5), 4 * x.numel() * size / copy_speed),
        "rotary (q, k)": (lambda ops: ops.rotary_embedding_(qkv[:, : h + kvh], cos, sin),
                          2 * tokens * (h + kvh) * d * size / copy_speed),
        "prefill attention": (lambda ops: ops.paged_attention(query, k_cache, v_cache, table, lens, cu, d**-0.5),
                              attention_flops),
    }


def thread_clock():
    """On one thread its CPU time (a shared machine's other processes then cost less of the
    reading, as in bench_limits.py's --amx-linear), else the wall clock."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def timeit(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    clock, times = thread_clock(), []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def run_cpu_prefill(args: argparse.Namespace) -> int:
    """One prefill layer's kernels (see the module's docstring), new and --baseline alternating."""
    import kernels.cpu_ops  # noqa: F401  builds and registers torch.ops.bento_llm

    kernels = {"new": torch.ops.bento_llm}
    if args.baseline:
        kernels = {"baseline": baseline_ops(args.baseline), **kernels}
    gen = torch.Generator().manual_seed(0)
    gflops = args.attention_gflops
    print(f"CPU prefill kernels, {args.prompt_len} tokens, {torch.get_num_threads()} threads, SmolLM2's shape; "
          f"median of {args.repeats} calls (builds alternating, in turn first; on 1 thread CPU time); "
          f"elementwise limit: its bytes at a copy's speed, attention's: its causal FLOPs at {gflops} GFLOP/s")
    print("| dtype | kernel | " + " | ".join(f"{n} ms" for n in kernels) + " | limit ms | ratio to limit (new) |"
          + (" new/baseline |" if args.baseline else ""))
    print("| --- " * (4 + len(kernels) + bool(args.baseline)) + "|")
    for dtype in (torch.bfloat16, torch.float32):
        for name, (call, limit) in prefill_cases(args.prompt_len, dtype, gen).items():
            if name == "prefill attention":
                limit = limit / (gflops * 1e9)
            times, clock = {n: [] for n in kernels}, thread_clock()
            for ops in kernels.values():
                call(ops)  # warm-up
            for repeat in range(args.repeats):
                # Each build goes first every other round: the second call of a round measured up to
                # 15% slower than the first on the same code.
                for n, ops in sorted(kernels.items(), reverse=repeat % 2 == 1):
                    start = clock()
                    call(ops)
                    times[n].append(clock() - start)
            ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
            cells = " | ".join(f"{ms[n]:.2f}" for n in kernels)
            ratio = ms["new"] / (limit * 1e3)
            ab = f" {ms['new'] / ms['baseline']:.2f} |" if args.baseline else ""
            print(f"| {str(dtype).removeprefix('torch.')} | {name} | {cells} | {limit * 1e3:.2f} | {ratio:.2f} |{ab}",
                  flush=True)
    return 0


def run_cpu(args: argparse.Namespace) -> int:
    from bench.bench_limits import read_bandwidth
    from kernels import cpu_ops

    kernels = {"new": cpu_ops.decode_attention}
    if args.baseline:
        kernels = {"baseline": baseline_decode_attention(args.baseline), **kernels}
    dtype, bs, h, kvh, d = DTYPES[args.dtype], args.block_size, args.num_heads, args.num_kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    print(f"CPU decode attention, {torch.get_num_threads()} threads, heads {h}/{kvh}, head_dim {d}, block {bs}, "
          f"{args.dtype}, {args.layers} layers' caches in turn; ratio = time / (K+V bytes / read bandwidth)")
    rows = []
    for ctx in args.context_lens:
        for batch in args.batch_sizes:
            per_seq = math.ceil(ctx / bs)
            num_blocks = batch * per_seq + 8
            caches = [(torch.randn(num_blocks, bs, kvh, d, generator=gen).to(dtype),
                       torch.randn(num_blocks, bs, kvh, d, generator=gen).to(dtype)) for _ in range(args.layers)]
            # Shuffled physical blocks, as a long-running server's free list hands them out.
            tables = torch.randperm(num_blocks, generator=gen)[: batch * per_seq].view(batch, per_seq).int()
            lens = torch.full((batch,), ctx, dtype=torch.int32)
            queries = [torch.randn(batch, h, d, generator=gen).to(dtype) for _ in range(args.layers)]
            kv_bytes = 2 * batch * ctx * kvh * d * caches[0][0].element_size()

            def step(op):  # one call per layer: the mean seconds per call and the last output
                start = time.perf_counter()
                for (k, v), q in zip(caches, queries):
                    out = op(q, k, v, tables, lens, d**-0.5)
                return (time.perf_counter() - start) / args.layers, out

            times = {name: [] for name in kernels}
            outs = {name: step(op)[1] for name, op in kernels.items()}  # warm-up
            repeats = max(3, min(50, int(0.3 / max(1e-6, kv_bytes * args.layers / 20e9))))
            for _ in range(repeats):
                for name, op in kernels.items():
                    times[name].append(step(op)[0])
            bandwidth = read_bandwidth(5)
            row = dict(batch=batch, context=ctx, kv_mib=kv_bytes / 2**20, read_gbs=bandwidth / 1e9,
                       limit_us=kv_bytes / bandwidth * 1e6)
            for name in kernels:
                seconds = statistics.median(times[name])
                row[f"{name}_us"] = seconds * 1e6
                row[f"{name}_ratio"] = seconds * bandwidth / kv_bytes
            if args.baseline:
                row["new/baseline"] = row["new_us"] / row["baseline_us"]
                row["max_abs_diff"] = (outs["new"].float() - outs["baseline"].float()).abs().max().item()
            rows.append(row)
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device="cpu", threads=torch.get_num_threads(), args=vars(args), results=rows), f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_prefill:
        return run_cpu_prefill(args)
    if args.cpu:
        return run_cpu(args)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False. "
                 "(The kernels' correctness tests run on CPU: pytest tests/test_kernels.py.)")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(args.rep_ms)
    print(f"{name}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(f"heads {args.num_heads}/{args.num_kv_heads}, head_dim {args.head_dim}, block {args.block_size}, {args.dtype}")
    cols = ["batch", "context", "segments", "triton_ms", "triton_gbs", "triton_pct_copy"]
    if not args.no_sdpa:
        cols += ["sdpa_ms", "sdpa_gbs", "speedup_vs_sdpa", "max_abs_diff"]
    print(" ".join(f"{c:>15}" for c in cols))
    rows = []
    for ctx in args.context_lens:
        for batch in args.batch_sizes:
            row = run_case(args, batch, ctx, copy_bw)
            torch.cuda.empty_cache()
            if row is None:
                print(f"{batch:>15} {ctx:>15}  skipped: K+V over --max-kv-gib {args.max_kv_gib}")
                continue
            rows.append(row)
            print(" ".join(f"{row[c]:>15.4g}" if isinstance(row[c], float) else f"{row[c]:>15}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, copy_gbs=copy_bw / 1e9, args=vars(args), results=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
