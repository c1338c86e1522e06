"""Decode attention over a 16-bit KV cache against an 8-bit one (kv_cache_dtype int8 / fp8_e4m3).

    python bench/bench_kv_cache.py                          # C++ kernels, 4k context, batch 1 and 16
    python bench/bench_kv_cache.py --backend triton         # on a CUDA device
    python bench/bench_kv_cache.py --context-lens 256 --reps 3   # a quick check that it runs
    python bench/bench_kv_cache.py --layers 16              # K/V read from memory, as in a model's step

Decode attention reads every cached K and V row once per step, so its time follows the cache's
bytes: an 8-bit row is head_dim + 2 bytes where a 16-bit one is 2 x head_dim. The dtypes are timed
interleaved (A, B, A, B ...) in one process, and each row gives the median, so a noisy machine
biases none of them; the ratio column is each dtype's median over the first dtype's.

--layers N times N caches of the same shape called in turn (the ms column is per call), as a
model's decode step calls one per layer: once N caches outgrow the CPU's caches every call reads
its K/V from memory. With one (the default) a small batch's cache stays in L2/L3 between calls,
so the time is the kernel's arithmetic, not its bytes.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402

KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["cpu", "triton"], default="cpu")
    p.add_argument("--kv-dtypes", nargs="+", choices=sorted(KV_DTYPES), default=["bf16", "int8"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context-lens", type=int, nargs="+", default=[4096])
    # SmolLM2-135M's attention: 9 query heads over 3 KV heads of 64.
    p.add_argument("--num-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per dtype, interleaved")
    p.add_argument("--layers", type=int, default=1, help="caches called in turn per timed step (see above)")
    args = p.parse_args(argv)
    if args.layers < 1:
        p.error("--layers must be at least 1")
    if args.num_heads % args.num_kv_heads:
        p.error("--num-heads must be a multiple of --num-kv-heads")
    if args.backend == "triton" and not torch.cuda.is_available():
        p.error("--backend triton needs a CUDA device")
    return args


def make_case(args, kv_dtype: torch.dtype, batch: int, ctx: int, device: torch.device):
    """Random K/V written through the backend's own cache write (so 8-bit rows carry real scales),
    in shuffled physical blocks."""
    from kernels import reference

    ops = importlib.import_module("kernels.cpu_ops" if args.backend == "cpu" else "kernels.triton_ops")
    bs, kvh, d = args.block_size, args.num_kv_heads, args.head_dim
    per_seq = math.ceil(ctx / bs)
    num_blocks = batch * per_seq
    row = d + (reference.KV_SCALE_BYTES if kv_dtype.itemsize == 1 else 0)
    k_cache = torch.zeros(num_blocks, bs, kvh, row, dtype=kv_dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.randperm(num_blocks, device=device).view(batch, per_seq).int()
    for s in range(batch):
        slots = (tables[s].long()[:, None] * bs + torch.arange(bs, device=device)).flatten()[:ctx]
        kv = torch.randn(2, ctx, kvh, d, device=device, dtype=torch.bfloat16)
        ops.write_kv_cache(kv[0], kv[1], k_cache, v_cache, slots)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    query = torch.randn(batch, args.num_heads, d, device=device, dtype=torch.bfloat16)
    kv_bytes = 2 * k_cache[0].numel() * k_cache.element_size() * ctx / bs * batch
    layers = [(k_cache, v_cache)] + [(k_cache.clone(), v_cache.clone()) for _ in range(args.layers - 1)]

    def call():
        for k, v in layers:
            ops.decode_attention(query, k, v, tables, lens, d**-0.5)

    return call, kv_bytes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.backend == "triton" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    print(f"{args.backend} backend, {torch.get_num_threads()} threads, heads {args.num_heads}/{args.num_kv_heads}, "
          f"head_dim {args.head_dim}, block {args.block_size}, {args.layers} layer(s); "
          f"median of {args.reps} interleaved calls")
    print(f"{'batch':>6} {'context':>8} {'kv':>9} {'KV MiB':>8} {'ms':>9} {'GB/s':>7} {'ratio':>6}")
    for ctx in args.context_lens:
        for batch in args.batch_sizes:
            cases = {name: make_case(args, KV_DTYPES[name], batch, ctx, device) for name in args.kv_dtypes}
            times = {name: [] for name in cases}
            for name, (call, _) in cases.items():  # warm-up: kernel builds, first-touch pages
                call()
            for _ in range(args.reps):
                for name, (call, _) in cases.items():
                    sync()
                    start = time.perf_counter()
                    call()
                    sync()
                    times[name].append((time.perf_counter() - start) / args.layers)
            first = statistics.median(times[args.kv_dtypes[0]])
            for name, (_, kv_bytes) in cases.items():
                ms = statistics.median(times[name]) * 1e3
                print(f"{batch:>6} {ctx:>8} {name:>9} {kv_bytes / 2**20:>8.1f} {ms:>9.3f} "
                      f"{kv_bytes / (ms * 1e-3) / 1e9:>7.1f} {ms / 1e3 / first:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
