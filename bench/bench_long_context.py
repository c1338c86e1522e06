"""Long prompts, offline: TTFT and prefill tokens/s, decode step time, a prefix-cache hit.

    python bench/bench_long_context.py --backend torch cpu     # before/after in one run (issue 18)
    python bench/bench_long_context.py --quick                 # a small size, to check it runs
    python bench/bench_long_context.py --dtype bfloat16 --backend cpu-float32-tiles cpu   # AMX tiles A/B

For each attention backend, in one process on the default model:
- TTFT (the whole prefill, chunked by the scheduler's token budget) and prefill tokens/s of one
  prompt of each length, prefix caching off;
- decode step time at each context with 1 and 16 sequences (distinct prompts, so every sequence
  reads its own KV blocks), the median of --decode-steps pure-decode steps;
- a prefix-cache hit: a --doc-tokens shared document, then the same document with another
  --question-tokens question (TTFT of the second).
The matmul limit is measured in the same run (a square matmul the way the engine's projections
run, in the engine's dtype and in bfloat16 where the CPU has it natively, on the engine's
threads), and each prefill rate is shown against it: the model's
matmuls, 2 x (non-embedding weights) FLOPs a token, plus causal attention's 4 x d x heads x
position FLOPs a token, at the measured limit, over the measured TTFT.

Targets (issue 18): 4k TTFT <= 3 s; prefill tok/s at 4k >= 80% of the rate at 256; batch-1
decode step at 4k <= 1.3x the step at 256; prefix-hit TTFT < 0.3 s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no weight-loading progress bars between the rows
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--backend", nargs="+", choices=["torch", "cpu", "cpu-float32-tiles"], default=["cpu"],
                   help="attention backends to run, one after the other in this process; cpu-float32-tiles is "
                        "cpu with bfloat16 attention's tile products in float32, as before they ran on AMX")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4000, 8000])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--doc-tokens", type=int, default=4000)
    p.add_argument("--question-tokens", type=int, default=50)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="the scheduler's token budget (default: the engine's)")
    p.add_argument("--quantization", default="none",
                   help="weights in --dtype by default here (attention is what this measures); 'auto' is the engine's default")
    p.add_argument("--quick", action="store_true", help="lengths 256 and 1024, batches 1 and 4, a 1024-token document")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.decode_batches, args.doc_tokens, args.decode_steps = [256, 1024], [1, 4], 1024, 4
    return args


def matmul_limit(dtype: torch.dtype, threads: int, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n matmul in dtype on `threads` threads (best of 3 s), the way the
    engine's projections run on CPU: a weight packed for oneDNN where it can be."""
    from engine.layers.linear_kernels import can_pack_for_cpu

    torch.set_num_threads(threads)
    x, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    if can_pack_for_cpu(torch.device("cpu"), dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)

        def matmul():
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    else:
        def matmul():
            return torch.nn.functional.linear(x, w)
    matmul()
    best, deadline = float("inf"), time.perf_counter() + 3.0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure_limits(engine_dtype: torch.dtype, threads: int) -> dict:
    """The engine dtype's matmul limit; bfloat16's too where the CPU runs it natively (emulated
    bfloat16 is 10-100x slower and says nothing about the kernels)."""
    from engine.config import cpu_has_native_bfloat16

    dtypes = [engine_dtype] + ([torch.bfloat16] if cpu_has_native_bfloat16() else [])
    return {dtype: matmul_limit(dtype, threads) for dtype in dict.fromkeys(dtypes)}


def flops_per_token(mc, position: int) -> float:
    """The model's matmuls (non-embedding weights, twice) plus causal attention at `position`."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    weights = mc.num_layers * (mc.hidden_size * (2 * q + 2 * kv) + 3 * mc.hidden_size * mc.intermediate_size)
    return 2 * weights + mc.num_layers * 4 * q * position


def random_prompt(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=gen).tolist()


def run_to_completion(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def ttft(engine, prompt: list[int], rid: str) -> float:
    from engine import SamplingParams

    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    run_to_completion(engine)
    return time.perf_counter() - start


def decode_step_ms(engine, prompts: list[list[int]], steps: int, rid: str) -> float:
    """Median time of a step that only decodes, every prompt prefilled first."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{rid}-{i}", prompt, params)
    groups = [engine.requests[f"{rid}-{i}"] for i in range(len(prompts))]
    while any(s.num_uncomputed_tokens > 1 for g in groups for s in g.seqs):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    run_to_completion(engine)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def float32_tile_products():
    """The cpu backend's attention with float32 tile products even for bfloat16 caches: oneDNN
    (which the AMX tile products go through) is switched off around each attention call only, so
    the model's matmuls run as usual."""
    from kernels import cpu_ops

    saved = cpu_ops.paged_attention, cpu_ops.decode_attention

    def without_onednn(op):
        def call(*args):
            torch.backends.mkldnn.enabled = False
            try:
                return op(*args)
            finally:
                torch.backends.mkldnn.enabled = True

        return call

    cpu_ops.paged_attention, cpu_ops.decode_attention = map(without_onednn, saved)
    try:
        yield
    finally:
        cpu_ops.paged_attention, cpu_ops.decode_attention = saved


def run_backend(args, backend: str, gen: torch.Generator, limits: dict, label: str | None = None) -> dict:
    """Measures one backend; fills limits (dtype -> GFLOP/s) for the engine's dtype on first use."""
    if backend == "cpu-float32-tiles":
        with float32_tile_products():
            return dict(run_backend(args, "cpu", gen, limits, label=backend), backend=backend)
    from engine import LLM

    longest = max(args.lengths + [args.doc_tokens + args.question_tokens])
    extra = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    extra["quantization"] = args.quantization
    llm = LLM(args.model, attention_backend=backend, dtype=args.dtype, num_threads=args.threads,
              enable_prefix_caching=False, max_model_len=longest + args.decode_steps + 8,
              kv_cache_memory_bytes=KV_BYTES, **extra)
    engine = llm.engine
    chunk = engine.scheduler.max_num_batched_tokens  # a prompt longer than this prefills in chunks of it
    mc, vocab = engine.model_config, engine.model_config.vocab_size
    dtype = engine.runner.dtype
    if dtype not in limits:
        limits.update(measure_limits(dtype, args.threads))
    limit = limits[dtype]
    ttft(engine, random_prompt(gen, 64, vocab), "warmup")
    rows = []
    for n in args.lengths:
        seconds = ttft(engine, random_prompt(gen, n, vocab), f"prefill-{n}")
        ideal = sum(flops_per_token(mc, p) for p in range(0, n, 64)) * 64 / (limit * 1e9)
        row = dict(length=n, ttft=seconds, tok_s=n / seconds, of_limit=ideal / seconds)
        for batch in args.decode_batches:
            prompts = [random_prompt(gen, n, vocab) for _ in range(batch)]
            row[f"step_{batch}"] = decode_step_ms(engine, prompts, args.decode_steps, f"decode-{n}-{batch}")
        rows.append(row)
        print(f"  [{label or backend}] {row}", flush=True)
    llm.shutdown()
    del llm, engine
    gc.collect()

    # Prefix caching on for the shared-document run.
    llm = LLM(args.model, attention_backend=backend, dtype=args.dtype, num_threads=args.threads,
              enable_prefix_caching=True, max_model_len=longest + args.decode_steps + 8,
              kv_cache_memory_bytes=KV_BYTES, **extra)
    doc = random_prompt(gen, args.doc_tokens, vocab)
    cold = ttft(llm.engine, doc + random_prompt(gen, args.question_tokens, vocab), "doc-cold")
    hit = ttft(llm.engine, doc + random_prompt(gen, args.question_tokens, vocab), "doc-hit")
    llm.shutdown()
    return dict(backend=backend, dtype=str(dtype).removeprefix("torch."), limit=limit, rows=rows, cold=cold, hit=hit,
                chunk=chunk)


# Room for 16 sequences at the longest context in any dtype here (16 x 8k tokens x 30 layers of
# SmolLM2's 3 KV heads x 64 x 2 x 4 bytes is ~5.9 GiB in float32).
KV_BYTES = 7 << 30


def report(args, results: list[dict], limits: dict) -> str:
    machine = platform.processor() or platform.machine()
    measured = ", ".join(f"{str(k).removeprefix('torch.')} {v:.0f} GFLOP/s" for k, v in limits.items())
    lines = [
        f"`python bench/bench_long_context.py {' '.join(sys.argv[1:])}` on {machine}, "
        f"{args.threads} threads, torch {torch.__version__}",
        "",
        f"matmul limit (2048^3, oneDNN-packed as the engine runs it): {measured}; prefill chunk (the "
        f"scheduler's token budget): {', '.join(sorted({str(r['chunk']) for r in results}))} tokens",
        "",
    ]
    batches = args.decode_batches
    head = ["backend", "dtype", "prompt", "TTFT s", "prefill tok/s", "vs 256", "of matmul limit"]
    head += [f"decode step ms, {b} seq" for b in batches] + [f"step / step at {args.lengths[0]}, 1 seq"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for res in results:
        first = res["rows"][0]
        for row in res["rows"]:
            cells = [res["backend"], res["dtype"], str(row["length"]), f"{row['ttft']:.2f}", f"{row['tok_s']:.0f}",
                     f"{row['tok_s'] / first['tok_s']:.2f}", f"{row['of_limit']:.0%}"]
            cells += [f"{row[f'step_{b}']:.1f}" for b in batches]
            cells.append(f"{row[f'step_{batches[0]}'] / first[f'step_{batches[0]}']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for res in results:
        lines.append(f"- {res['backend']}: {args.doc_tokens}-token shared document + {args.question_tokens}-token "
                     f"question: TTFT {res['cold']:.2f} s cold, {res['hit']:.3f} s on a prefix-cache hit")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    limits: dict = {}
    results = [run_backend(args, backend, gen, limits) for backend in args.backend]
    print(report(args, results, limits))


if __name__ == "__main__":
    main()
