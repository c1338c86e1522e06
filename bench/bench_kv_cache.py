"""Decode attention over a 16-bit KV cache against an 8-bit one (kv_cache_dtype int8 / fp8_e4m3).

    python bench/bench_kv_cache.py                          # C++ kernels, 4k context, batch 1 and 16
    python bench/bench_kv_cache.py --kv-dtypes f32 bf16      # a float32 model's cache beside bfloat16's
    python bench/bench_kv_cache.py --backend triton         # on a CUDA device
    python bench/bench_kv_cache.py --context-lens 256 --reps 3   # a quick check that it runs
    python bench/bench_kv_cache.py --layers 16              # K/V read from memory, as in a model's step
    python bench/bench_kv_cache.py --batch-sizes 1 16 64 --context-lens 128 512 2048 4096 \
        --kv-dtypes bf16 int8 fp8_e4m3 --layers auto --before-tree /work/main   # issue 16's table, A/B

Decode attention reads every cached K and V row once per step, so its time follows the cache's
bytes: an 8-bit row is head_dim + 2 bytes (on CUDA padded to 16; KV MiB and GB/s count the rows as
stored, padding included) where a 16-bit one is 2 x head_dim. The dtypes are timed
interleaved (A, B, A, B ...) in one process, and each row gives the median, so a noisy machine
biases none of them; the ratio column is each dtype's median over the first dtype's.

--layers N times N caches of the same shape called in turn (the ms column is per call), as a
model's decode step calls one per layer: once N caches outgrow the CPU's caches every call reads
its K/V from memory. With one (the default) a small batch's cache stays in L2/L3 between calls,
so the time is the kernel's arithmetic, not its bytes. --layers auto: as many (up to 1024) as make
each timed step read at least 512 MiB.

Memory read bandwidth is measured in the same run (bench_limits.read_bandwidth); the "x read"
column is each time over its K/V bytes' read time at that bandwidth (1.0: the memory's speed).

--before-tree DIR: that tree's attention (its kernels/csrc/cpu_ops.cpp on its own thread pool) is
built beside this one's, renamed so both load in one process, and every dtype is timed through it
too ("int8@before"), interleaved with this tree's calls on the same caches: an A/B in one process.

--query-len N: each sequence's last N context tokens are a prefill chunk (paged_attention), not one
decode token: a 2000-token prompt's attention at --batch-sizes 1 --context-lens 2000 --query-len 2000
(its products are compute-bound: read the ms and ratio columns, not "x read").

--clock cpu: each call's time is the process's CPU time (time.process_time), not the wall clock:
on a shared machine a call descheduled for a while does not count that while (with one thread,
--threads 1, that is one core's time; with N it sums the N threads').
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402

KV_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
             "fp8_e4m3": torch.float8_e4m3fn}


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
    p.add_argument("--layers", default="1", help="caches called in turn per timed step, or auto (see above)")
    p.add_argument("--before-tree", default=None, help="a checkout whose attention to time beside this one's")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="see above")
    p.add_argument("--query-len", type=int, default=1, help="query tokens per sequence (see above)")
    p.add_argument("--unpadded", action="store_true",
                   help="on CUDA, time each 8-bit cache with unpadded rows (head_dim + 2 bytes) beside the padded ones")
    args = p.parse_args(argv)
    if args.layers != "auto" and (not args.layers.isdigit() or int(args.layers) < 1):
        p.error("--layers must be a positive integer or auto")
    if args.query_len < 1 or args.query_len > min(args.context_lens):
        p.error("--query-len must be between 1 and the shortest context")
    if args.num_heads % args.num_kv_heads:
        p.error("--num-heads must be a multiple of --num-kv-heads")
    if args.backend == "triton" and not torch.cuda.is_available():
        p.error("--backend triton needs a CUDA device")
    if args.before_tree and args.backend != "cpu":
        p.error("--before-tree compares the C++ kernels: --backend cpu only")
    if args.before_tree and not (Path(args.before_tree) / "kernels" / "csrc" / "cpu_ops.cpp").is_file():
        p.error(f"--before-tree: no kernels/csrc/cpu_ops.cpp under {args.before_tree}")
    return args


BEFORE_NAMESPACE = "bento_llm_before"


def load_before(tree: str, sources: tuple[str, ...] = ("cpu_ops.cpp", "thread_pool.cpp")) -> None:
    """That tree's attention as torch.ops.bento_llm_before.*: its cpu_ops.cpp and thread_pool.cpp
    (or `sources` of its kernels/csrc; bench_layer_ops.py adds step_ops.cpp) and headers copied with
    the op namespace (and the ops named in the sources) and the pool's C++ namespace renamed, built
    with the backend's flags (kernels.cpu_ops.load_sources; cached like the backend's own build)."""
    from kernels.cpu_ops import load_sources

    src = Path(tree) / "kernels" / "csrc"
    dst = Path(os.environ.get("TORCH_EXTENSIONS_DIR", tempfile.gettempdir())) / "bench_kv_cache_before"
    dst.mkdir(parents=True, exist_ok=True)
    for path in [*src.glob("*.h"), *(src / name for name in sources)]:
        text = (path.read_text().replace("TORCH_LIBRARY(bento_llm,", f"TORCH_LIBRARY({BEFORE_NAMESPACE},")
                .replace("TORCH_LIBRARY_FRAGMENT(bento_llm,", f"TORCH_LIBRARY_FRAGMENT({BEFORE_NAMESPACE},")
                .replace('"bento_llm::', f'"{BEFORE_NAMESPACE}::')
                .replace("kernel_pool", "kernel_pool_before"))
        target = dst / path.name
        if not target.exists() or target.read_text() != text:  # an unchanged copy is not rebuilt
            target.write_text(text)
    # One extension name per set of sources: two benchmarks' builds do not replace each other.
    load_sources(BEFORE_NAMESPACE + "_" + "_".join(Path(name).stem for name in sources),
                 [dst / name for name in sources])


AUTO_LAYER_BYTES = 512 << 20  # past the 300 MiB L3 of the machine this was written on


def make_case(args, kv_dtype: torch.dtype, batch: int, ctx: int, device: torch.device, padded: bool = True):
    """Random K/V written through the backend's own cache write (so 8-bit rows carry real scales),
    in shuffled physical blocks; returns {label: timed call} (this tree's, and the --before-tree
    build's) and the K/V bytes one call reads."""
    from kernels import reference

    ops = importlib.import_module("kernels.cpu_ops" if args.backend == "cpu" else "kernels.triton_ops")
    bs, kvh, d = args.block_size, args.num_kv_heads, args.head_dim
    per_seq = math.ceil(ctx / bs)
    num_blocks = batch * per_seq
    row = reference.kv_row_width(d, kv_dtype, device if padded else "cpu")  # a CPU row: unpadded
    k_cache = torch.zeros(num_blocks, bs, kvh, row, dtype=kv_dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.randperm(num_blocks, device=device).view(batch, per_seq).int()
    for s in range(batch):
        slots = (tables[s].long()[:, None] * bs + torch.arange(bs, device=device)).flatten()[:ctx]
        kv = torch.randn(2, ctx, kvh, d, device=device, dtype=torch.bfloat16)
        ops.write_kv_cache(kv[0], kv[1], k_cache, v_cache, slots)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    # A float32 cache is a float32 model's, whose queries are float32 too; the others, bfloat16's.
    q_dtype = torch.float32 if kv_dtype == torch.float32 else torch.bfloat16
    query = torch.randn(batch * args.query_len, args.num_heads, d, device=device, dtype=q_dtype)
    cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * args.query_len
    kv_bytes = 2 * k_cache[0].numel() * k_cache.element_size() * ctx / bs * batch
    count = min(1024, math.ceil(AUTO_LAYER_BYTES / kv_bytes)) if args.layers == "auto" else int(args.layers)
    layers = [(k_cache, v_cache)] + [(k_cache.clone(), v_cache.clone()) for _ in range(count - 1)]

    def timed(namespace):
        def call():
            for k, v in layers:
                if args.query_len == 1:
                    namespace.decode_attention(query, k, v, tables, lens, d**-0.5)
                else:
                    namespace.paged_attention(query, k, v, tables, lens, cu, d**-0.5)
            return len(layers)

        return call

    calls = {"": timed(ops)}
    if args.before_tree:
        calls["@before"] = timed(getattr(torch.ops, BEFORE_NAMESPACE))
    return calls, kv_bytes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.backend == "triton" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.before_tree:
        load_before(args.before_tree)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    bandwidth = float("nan")
    if device.type == "cpu":
        from bench.bench_limits import read_bandwidth

        bandwidth = read_bandwidth(5)
    print(f"{args.backend} backend, {torch.get_num_threads()} threads, heads {args.num_heads}/{args.num_kv_heads}, "
          f"head_dim {args.head_dim}, block {args.block_size}, {args.query_len} query token(s), {args.layers} layer(s); "
          f"median of {args.reps} interleaved calls, {args.clock} clock; memory read {bandwidth / 1e9:.1f} GB/s")
    print(f"{'batch':>6} {'context':>8} {'kv':>16} {'KV MiB':>8} {'ms':>9} {'GB/s':>7} {'x read':>6} {'ratio':>6}")
    for ctx in args.context_lens:
        for batch in args.batch_sizes:
            cases = {}
            for name in args.kv_dtypes:
                calls, kv_bytes = make_case(args, KV_DTYPES[name], batch, ctx, device)
                cases.update({name + label: (call, kv_bytes) for label, call in calls.items()})
                if args.unpadded and KV_DTYPES[name].itemsize == 1 and device.type == "cuda":
                    calls, kv_bytes = make_case(args, KV_DTYPES[name], batch, ctx, device, padded=False)
                    cases[name + " unpadded"] = (calls[""], kv_bytes)
            times = {name: [] for name in cases}
            for call, _ in cases.values():  # warm-up: kernel builds, first-touch pages
                call()
            for _ in range(args.reps):
                for name, (call, _) in cases.items():
                    sync()
                    start = clock()
                    count = call()
                    sync()
                    times[name].append((clock() - start) / count)
            first = statistics.median(times[args.kv_dtypes[0]])
            for name, (_, kv_bytes) in cases.items():
                ms = statistics.median(times[name]) * 1e3
                print(f"{batch:>6} {ctx:>8} {name:>16} {kv_bytes / 2**20:>8.1f} {ms:>9.3f} "
                      f"{kv_bytes / (ms * 1e-3) / 1e9:>7.1f} {ms * 1e-3 * bandwidth / kv_bytes:>6.2f} "
                      f"{ms / 1e3 / first:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
