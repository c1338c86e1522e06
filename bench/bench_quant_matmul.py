"""Quantized matmuls against oneDNN's packed bfloat16, at the default model's projection shapes.

    python bench/bench_quant_matmul.py                  # rows 1, 4, 16, 64, 256, 2000; one thread
    python bench/bench_quant_matmul.py --rows 1,8,64 --threads 2
    python bench/bench_quant_matmul.py --shapes 3b --layers 2 --rows 1,16,64 --only "bf16 strips,int4 layer,int8 layer"
    python bench/bench_quant_matmul.py --baseline d98b55c --only "bf16 strips,int4 AMX,int8 AMX"   # A/B against a commit
    python bench/bench_quant_matmul.py --shapes 3b-head --layers 1 --rows 1,16 --threads 2 --only "int8 layer"
    python bench/bench_quant_matmul.py --shapes head --layers 2 --rows 1,4,16,64,256 --only "bf16 strips,bf16 rows,int8 layer"
    python bench/bench_quant_matmul.py --shapes head --layers 2 --rows 4,8,16,64 --baseline main --only "bf16 strips,bf16 rows"
    python bench/bench_quant_matmul.py --hot --rows 1,2,4 --only "int4 rows,int8 rows"   # compute rate: one weight, in cache
    python bench/bench_quant_matmul.py --shapes head --layers 2 --rows 1,2 --threads 2 --us --only "int8 rows,int8 rows prefetching"
        # int8_mm_rows' streaming and prefetching loops, A/B (the int4 model's LM head)

For each shape (SmolLM2-135M: qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536) it builds
--layers random weights (as many as the model has layers, so the set does not sit in L2 the way
one repeated weight would; --hot: one weight, passed --layers times, so it does, and the times are
the loops' compute rate: where a loop's hot time is well under its time from memory, memory bounds
it) in each format, then times one pass over all of them per format,
interleaved in one process, keeping each format's best of --rounds. Time is the thread's CPU
time at one thread (robust on a shared machine), wall time otherwise. Reported: bfloat16's
microseconds per layer and each format's time relative to it (below 1 is faster):
- bfloat16: oneDNN's packed bfloat16 (_linear_pointwise), the engine's bfloat16 projection on a CPU
  without AMX
- bf16 strips: the engine's bfloat16 projection, column strips: kernels/csrc/amx_linear.cpp on AMX,
  else bf16_linear.cpp (AVX512-BF16)
- bf16 rows: the same weight as it lies ([N, K], the tied LM head's layout, the embedding table),
  through few_rows_bfloat16 (kernels/csrc/gemv_ops.cpp: brgemm on AMX, bf16_mm_rows' dot products
  on AVX512-BF16) at any row count (the engine takes it up to AMX_FEW_ROWS rows, F.linear beyond)
- int4 / int8 torch: PyTorch's packed ops (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm)
- int4 / int8 AMX: kernels/csrc/quant_ops.cpp's AMX tile loops on the same codes (int4: AMX-BF16 on
  codes converted per call; int8: AMX-INT8 on the codes as they are, the input split per row into
  16-bit fixed point)
- int4 / int8 rows: its few-row loops over the same codes (int4: AVX512-BF16 on torch's layout;
  int8: AVX512-VNNI byte dot products on the split input)
- int8 rows prefetching: int8_mm_rows on its prefetching loop (set_int8_rows_streaming(False)), which
  Intel's CPUs take, where AMD's take its streaming loop (cpu_features.h's few_rows_stream_weights)
- int4 dpbf16 / int8 dpbusd / int8 dpbf16: its vector loops for CPUs without AMX (int4: blocks
  converted per call as for AMX, times the rows by vdpbf16ps; int8 dpbusd: int8 rows's byte
  products, register-blocked over 3 rows; int8 dpbf16: the codes converted per block to bfloat16
  as int4's, then the same vdpbf16ps loop); these, rows and dense need no AMX (AVX512-BF16 and VBMI; int8: AVX512-VNNI too)
- int4 dense: the int4 weight converted whole to bfloat16 per call, then oneDNN's matmul
- layer: what PackedQuantizedWeight runs at that row count (the faster of the two)
- w8a8: int8 codes times the input quantized per row to int8, AMX-INT8 or, without AMX, AVX512-VNNI
  (w8a8_mm_vnni; kernels/csrc/quant_ops.cpp), both rotated by w8a8's block Hadamard matrix (engine/layers/rotation.py) as the engine runs it;
  w8a8 plain: the same without the rotation (its cost is the difference)
- int4 / int8 AMX @REV, int4 / int8 rows @REV (--baseline REV): those kernels of kernels/csrc/quant_ops.cpp
  as they were at git revision REV, built beside this one, so a kernel change is timed A/B in one
  process (int8's run on the same codes in REV's layout where it differs: [N/64][K/2][64][2] before
  AMX-INT8); bf16 rows @REV likewise kernels/csrc/gemv_ops.cpp's (bf16_mm_amx on AMX, else bf16_mm_rows);
  bf16 strips @REV kernels/csrc/bf16_linear.cpp's (only without AMX, where bf16 strips runs it); w8a8 @REV
  its w8a8_mm_vnni called directly, beside w8a8 op, this tree's (only without AMX, where the layer runs
  it; REV must have it)
and the limits, also relative to bfloat16's time: int4 read, the time to read int4's codes,
scales and zeros at the measured memory bandwidth (int8 read: int8's codes and scales) (what bounds a few rows), and AMX, the
product's FLOPs at the bfloat16 matmul throughput oneDNN reaches on a large square product
(what bounds many rows).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_limits import best_seconds, read_bandwidth  # noqa: E402
from engine.layers.linear_kernels import avx512_bf16_ops, few_rows_bfloat16, strips_linear, strips_ops  # noqa: E402
from engine.layers.packed_weight import PackedQuantizedWeight  # noqa: E402
from engine.layers.quant import quantize, quantize_int4, quantize_int8  # noqa: E402
from engine.layers.quant_kernels import amx_kernels, vector_kernels  # noqa: E402

SHAPES = {
    "default": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)},
    # Llama-3.2-3B (bench_quant.py's 3B-shaped checkpoint): hidden 3072, 24/8 heads of 128, intermediate 8192
    "3b": {"qkv": (5120, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)},
    # Its tied LM head, int8 rows in the engine (394 MB: one weight is beyond the caches; --layers 1)
    "3b-head": {"lm_head": (128256, 3072)},
    # The default model's tied LM head (57 MB in bfloat16: beyond the caches; --layers 1): bfloat16
    # rows (bf16 rows) without quantization, int8 rows (int8 layer) under int4 or int8
    "head": {"lm_head": (49152, 576)},
}


def baseline_ops(revision: str):
    """torch.ops.bento_llm_baseline: kernels/csrc/quant_ops.cpp (and amx_tiles.h) and gemv_ops.cpp as
    at `revision`, built as an extension of its own under another op namespace; and whether its int8 ops read
    today's AMX-INT8 layout (else the [N/64][K/2][64][2] one before it)."""
    import kernels.cpu_ops  # the flags it builds with

    root = Path(__file__).resolve().parent.parent
    directory = Path(tempfile.mkdtemp(prefix="bento-quant-baseline-"))
    # quant_ops.cpp and what it includes; the thread pool's ops too, under the baseline's namespace;
    # bf16_linear.cpp (and strips_call.h) where the revision has them.
    names = ["quant_ops.cpp", "gemv_ops.cpp", "amx_tiles.h", "cpu_features.h", "thread_pool.h", "thread_pool.cpp"]
    strips = [f"kernels/csrc/{name}" for name in ("bf16_linear.cpp", "strips_call.h")]
    if all(subprocess.run(["git", "cat-file", "-e", f"{revision}:{path}"], cwd=root, stderr=subprocess.DEVNULL).returncode == 0
           for path in strips):
        names += ["bf16_linear.cpp", "strips_call.h"]
    for name in names:
        text = subprocess.run(["git", "show", f"{revision}:kernels/csrc/{name}"], cwd=root, check=True, capture_output=True,
                              text=True).stdout
        (directory / name).write_text(text.replace("TORCH_LIBRARY_FRAGMENT(bento_llm,", "TORCH_LIBRARY_FRAGMENT(bento_llm_baseline,"))
        if name == "quant_ops.cpp":
            int8_quads = "[N/64, K/4, 64, 4] int8 codes, K padded" in text
    kernels.cpu_ops.load_sources(f"bento_llm_quant_baseline_{revision}",
                                 [directory / name for name in names if name.endswith(".cpp")])
    return torch.ops.bento_llm_baseline, int8_quads


def int8_rows_prefetching(ops, x: torch.Tensor, weights: list, n: int) -> list:
    """int8_mm_rows over the weights on its prefetching loop, whichever loop the CPU's rule picks."""
    ops.set_int8_rows_streaming(False)
    try:
        return [ops.int8_mm_rows(x, q.qweight, q.scales, n) for q in weights]
    finally:
        ops.set_int8_rows_streaming(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,64,256,2000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hot", action="store_true", help="one weight per format, multiplied --layers times (it stays in "
                        "cache): each loop's compute rate, to read against the read columns")
    parser.add_argument("--us", action="store_true", help="microseconds per layer in every column, not ratios")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default", help="the default model's projections, the 3B's, or its LM head")
    parser.add_argument("--group-size", type=int, default=32, help="int4's group size")
    parser.add_argument("--baseline", help="a git revision whose int4/int8 loops and bfloat16 rows loop are timed beside this one's")
    parser.add_argument("--only", help="comma-separated columns to time (bfloat16 always runs; e.g. the 3B shapes "
                        "without PyTorch's slow many-row ops)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    ops, vec, cpu = amx_kernels(), vector_kernels(), torch.device("cpu")
    vnni = vec is not None and vec.avx512_vnni_supported()
    names = ["int4 read", "int8 read", "AMX", "bf16 strips", "bf16 rows", "int4 torch", "int4 AMX", "int4 dpbf16", "int4 rows", "int4 dense", "int4 layer", "int8 torch", "int8 AMX", "int8 dpbusd", "int8 dpbf16", "int8 rows",
             "int8 rows prefetching", "int8 layer", "w8a8", "w8a8 plain"]
    old, old_int8_quads = baseline_ops(args.baseline) if args.baseline and vec is not None else (None, True)
    if old is not None:
        for name in ("bf16 strips", "bf16 rows", "int4 AMX", "int4 rows", "int8 AMX", "int8 rows", "w8a8"):
            names.insert(names.index(name) + 1, f"{name} @{args.baseline}")
        names.insert(names.index("w8a8") + 1, "w8a8 op")
        # Two kernel pools, one a build: a worker spinning idle in one takes a vCPU from the other's
        # op, and reads its next weight ahead while the other's ops run (the baseline's ops, timed
        # back to back, gained 1.3x from it at two threads). Neither spins: each op wakes its worker.
        for pool in (torch.ops.bento_llm, old):
            pool.set_kernel_pool_spin_us(0)
    bandwidth = read_bandwidth(args.rounds)
    square = torch.randn(2048, 2048).bfloat16()
    square_packed = torch.ops.mkldnn._reorder_linear_weight(square, None)
    flops = 2 * 2048**3 / best_seconds(lambda: torch.ops.mkldnn._linear_pointwise(square, square_packed, None, "none", [], ""),
                                       args.rounds)
    print(f"{args.threads} thread(s), {'one weight (in cache) x ' if args.hot else ''}{args.layers} weights per shape, best of {args.rounds}; "
          f"AMX kernels {'available' if ops else 'NOT available (those columns are empty)'}; "
          f"vector kernels {'available' if vec else 'NOT available'}{'' if vnni or not vec else ' (int4 only: no AVX512-VNNI)'}; "
          f"memory read {bandwidth / 1e9:.1f} GB/s, bfloat16 matmul {flops / 1e12:.2f} TFLOP/s\n")
    print("| shape | rows | bfloat16 us/layer | " + " | ".join(names) + " |")
    print("|" + " --- |" * (3 + len(names)))
    group = args.group_size
    for shape, (n, k) in SHAPES[args.shapes].items():
        weights = [torch.randn(n, k) * 0.02 for _ in range(1 if args.hot else args.layers)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None) for w in weights]
        strip_ops = strips_ops()
        strips = [strip_ops.amx_linear_pack(w.bfloat16()) for w in weights] if strip_ops else []
        plain = [w.bfloat16() for w in weights] if not args.only or "bf16 rows" in args.only else []
        int4 = [PackedQuantizedWeight(quantize_int4(w, group), torch.bfloat16, cpu) for w in weights]
        int8 = [PackedQuantizedWeight(quantize_int8(w), torch.bfloat16, cpu) for w in weights]
        int8_rows = [q.int8_rows().contiguous() for q in int8]  # PyTorch's [N][K] layout for its op
        # The baseline's int8 codes: today's, or [N/64][K/2][64][2] (bfloat16 tile order, before AMX-INT8).
        int8_old = [q.qweight if old_int8_quads else r.reshape(-1, 64, k // 2, 2).transpose(1, 2).contiguous()
                    for q, r in zip(int8, int8_rows)] if old is not None else []
        # w8a8: AMX-INT8's tile loop, or (no AMX) AVX512-VNNI's byte products, as the layer picks
        has_w8a8 = ((ops is not None and ops.amx_int8_supported()) or (ops is None and vnni)) and (
            not args.only or "w8a8" in args.only)
        w8a8 = [PackedQuantizedWeight(quantize(w, "w8a8", 32), torch.bfloat16, cpu, int8_activations=True)
                for w in weights] if has_w8a8 else []
        w8a8_plain = [PackedQuantizedWeight(quantize_int8(w), torch.bfloat16, cpu, int8_activations=True)
                      for w in weights] if has_w8a8 else []
        if args.hot:  # the one weight, --layers times: each format's list as long as without --hot
            packed, strips, plain, int4, int8, int8_rows, int8_old, w8a8, w8a8_plain = (
                items * args.layers for items in (packed, strips, plain, int4, int8, int8_rows, int8_old, w8a8, w8a8_plain))
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k).bfloat16()
            runs = {
                "bfloat16": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed],
                "int4 torch": lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.qweight, group, q.scales) for q in int4],
                "int4 layer": lambda: [q(x) for q in int4],
                "int8 torch": lambda: [torch.ops.aten._weight_int8pack_mm(x, c, q.scales) for c, q in zip(int8_rows, int8)],
                "int8 layer": lambda: [q(x) for q in int8],
            }
            if strips:
                runs["bf16 strips"] = lambda: [strips_linear(x, s, None, n) for s in strips]
            if plain:
                runs["bf16 rows"] = lambda: [few_rows_bfloat16(x, w) for w in plain]
            if ops is not None:
                runs["int4 AMX"] = lambda: [ops.int4_mm_amx(x, q.qweight, q.scales, group, n) for q in int4]
                runs["int8 AMX"] = lambda: [ops.int8_mm_amx(x, q.qweight, q.scales, n) for q in int8]
            if vec is not None:
                runs["int4 rows"] = lambda: [vec.int4_mm_rows(x, q.qweight, q.scales, group, n) for q in int4]
                runs["int4 dense"] = lambda: [x @ vec.int4_dequantize(q.qweight, q.scales, group, n) for q in int4]
                if ops is None:
                    runs["int4 dpbf16"] = lambda: [vec.int4_mm_dpbf16(x, q.qweight, q.scales, group, n) for q in int4]
            if (ops is not None and ops.amx_int8_supported()) or (ops is None and vnni):
                runs["int8 rows"] = lambda: [vec.int8_mm_rows(x, q.qweight, q.scales, n) for q in int8]
                runs["int8 rows prefetching"] = lambda: int8_rows_prefetching(vec, x, int8, n)
                if ops is None:
                    runs["int8 dpbusd"] = lambda: [vec.int8_mm_dpbusd(x, q.qweight, q.scales, n) for q in int8]
                    runs["int8 dpbf16"] = lambda: [vec.int8_mm_dpbf16(x, q.qweight, q.scales, n) for q in int8]
            if old is not None and ops is not None:
                runs["int4 AMX @" + args.baseline] = lambda: [old.int4_mm_amx(x, q.qweight, q.scales, group, n) for q in int4]
                runs["int8 AMX @" + args.baseline] = lambda: [old.int8_mm_amx(x, p, q.scales, n) for p, q in zip(int8_old, int8)]
            if old is not None and "int4 rows" in runs:
                runs["int4 rows @" + args.baseline] = lambda: [old.int4_mm_rows(x, q.qweight, q.scales, group, n) for q in int4]
            if old is not None and "int8 rows" in runs:
                runs["int8 rows @" + args.baseline] = lambda: [old.int8_mm_rows(x, p, q.scales, n) for p, q in zip(int8_old, int8)]
            if old is not None and plain and (ops is not None or avx512_bf16_ops() is not None):  # as few_rows_bfloat16
                old_rows = old.bf16_mm_amx if ops is not None else old.bf16_mm_rows
                runs["bf16 rows @" + args.baseline] = lambda: [old_rows(x, w) for w in plain]
            if old is not None and strips and ops is None and hasattr(old, "bf16_linear"):  # as strips_linear without AMX
                runs["bf16 strips @" + args.baseline] = lambda: [old.bf16_linear(x, s, None, n) for s in strips]
            if w8a8:
                runs["w8a8"] = lambda: [q(x) for q in w8a8]
                runs["w8a8 plain"] = lambda: [q(x) for q in w8a8_plain]
            if w8a8 and old is not None and ops is None and hasattr(old, "w8a8_mm_vnni"):  # the layer's kernel without AMX
                # both ops called directly: the layer's Python (casts, the op lookup) adds a few us a call
                runs["w8a8 op"] = lambda: [vec.w8a8_mm_vnni(x, q.qweight, q.scales, n, q.rotation) for q in w8a8]
                runs["w8a8 @" + args.baseline] = lambda: [old.w8a8_mm_vnni(x, q.qweight, q.scales, n, q.rotation) for q in w8a8]
            if args.only:
                wanted = {"bfloat16", *args.only.split(","), *(f"{f} @{args.baseline}" for f in args.only.split(",")),
                          *(["w8a8 op"] if "w8a8" in args.only.split(",") else [])}
                runs = {name: fn for name, fn in runs.items() if name in wanted}
            best = dict.fromkeys(runs, float("inf"))
            with torch.inference_mode():
                for fn in runs.values():
                    fn()  # warm-up: oneDNN/brgemm kernels built, buffers touched
                for round in range(args.rounds):
                    # every other round in reverse, so no column always runs right after another
                    for name, fn in (reversed(runs.items()) if round % 2 else runs.items()):
                        start = clock()
                        fn()
                        best[name] = min(best[name], (clock() - start) / args.layers)
            base = best["bfloat16"]
            best["int4 read"] = (int4[0].qweight.numel() + int4[0].scales.numel() * 2) / bandwidth
            best["int8 read"] = (int8[0].qweight.numel() + int8[0].scales.numel() * 2) / bandwidth
            best["AMX"] = 2 * rows * n * k / flops
            cells = [("" if name not in best else f"{best[name] * 1e6:.1f}" if args.us else f"{best[name] / base:.2f}x")
                     for name in names]
            print(f"| {shape} {n}x{k} | {rows} | {base * 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
