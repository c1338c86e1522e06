"""The engine with its projections on column strips (bfloat16: kernels/csrc/amx_linear.cpp on AMX,
bf16_linear.cpp on AVX512-BF16; float32: f32_linear.cpp) against the same engine on oneDNN's
packed layout (what a CPU with neither runs, and what the engine ran before those kernels), both
loaded in this one process and measured in alternation, so a shared machine's load falls on both
alike.

    python bench/bench_strips.py                 # decode steps at batch 1, 16, 64 and TTFT
    python bench/bench_strips.py --rounds 5 --prompt-len 1000
    python bench/bench_strips.py --dtype float32   # the exact mode: f32_linear's strips vs oneDNN

Per round and engine: the median engine.step() of all-decoding steps at each batch size, and one
TTFT (a fresh prompt: no prefix-cache hits); the table gives each one's best round, its ratio to
the weight-read time (decode) and strips / oneDNN. With --threads 1 the clock is the thread's CPU
time (the engine runs on this thread then): a shared machine's other processes cost less of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402

from bench.bench_limits import random_prompt, read_bandwidth, step_read_bytes, timed_steps  # noqa: E402


def load(model: str, threads: int, strips: bool, dtype: str):
    from engine import LLM
    from engine.layers import linear

    original = linear.pack_strips
    if not strips:
        linear.pack_strips = lambda weight: None  # the layout a CPU without our strip kernels gets
    try:
        llm = LLM(model, dtype=dtype, quantization="none", num_threads=threads, max_num_seqs=64)
    finally:
        linear.pack_strips = original
    layers = [m for m in llm.engine.runner.model_runner.model.modules() if isinstance(m, linear.Linear)]
    assert any(m.strips for m in layers) == strips, "the strips did not take (no AMX-BF16 or AVX512-BF16 here?)"
    return llm.engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = {"strips": load(args.model, args.threads, True, args.dtype),
               "oneDNN": load(args.model, args.threads, False, args.dtype)}
    model = engines["strips"].runner.model_runner.model
    vocab = engines["strips"].model_config.vocab_size
    weight_read = step_read_bytes(model) / read_bandwidth(3)
    for engine in engines.values():  # warm-up: oneDNN builds a kernel per row count
        timed_steps(engine, [random_prompt(vocab, 32, 0)], 4)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    best: dict[tuple[str, str], float] = {}
    for r in range(args.rounds):
        for name, engine in engines.items():
            for batch in (1, 16, 64):
                prompts = [random_prompt(vocab, 32, 1000 * batch + i) for i in range(batch)]
                step = statistics.median(timed_steps(engine, prompts, args.decode_tokens, clock))
                best[name, f"decode step, batch {batch}"] = min(step, best.get((name, f"decode step, batch {batch}"), step))
            start = clock()
            timed_steps(engine, [random_prompt(vocab, args.prompt_len, 7 + 2 * r + (name == "oneDNN"))], 1)
            ttft = clock() - start
            key = f"TTFT, {args.prompt_len}-token prompt"
            best[name, key] = min(ttft, best.get((name, key), ttft))
    print(f"\n{args.model}, {args.dtype}, {args.threads} threads ({clock.__name__}), weight-read time {weight_read * 1e3:.2f} ms, "
          f"best of {args.rounds} alternating rounds; `python bench/bench_strips.py {' '.join(sys.argv[1:])}`\n")
    print("| measure | strips ms | oneDNN ms | strips / oneDNN | strips / read | oneDNN / read |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key in dict.fromkeys(k for _, k in best):
        s, d = best["strips", key], best["oneDNN", key]
        reads = f"| {s / weight_read:.2f} | {d / weight_read:.2f} |" if key.startswith("decode") else "| | |"
        print(f"| {key} | {s * 1e3:.2f} | {d * 1e3:.2f} | {s / d:.2f} {reads}")


if __name__ == "__main__":
    main()
