"""Structured outputs' cost: offline tok/s at concurrency 16 with and without a JSON schema on
every request, and grammar compile times for the test schemas (tests/structured_schemas.py).

    python bench/bench_structured.py                  # ~1-2 minutes on 2 threads
    python bench/bench_structured.py --rounds 3 --no-append

Both runs decode the same 16 chat prompts for exactly --max-tokens tokens each (ignore_eos; the
schema is a long fixed-size array, so no grammar ends early), so they do the same model work and
the difference is the grammar: filling each row's token bitmask, applying it, advancing the
matchers. Runs alternate (plain, json, plain, json, ...) so machine noise hits both alike; the
best round of each is reported. Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402

from bench.bench_offline import chat_prompts  # noqa: E402

CONCURRENCY = 16
# ~10 tokens per item: 40 items never end inside the token budget, so every request decodes
# exactly max_tokens tokens, as the unconstrained ones do.
LONG_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["word", "n"],
        "additionalProperties": False,
    },
    "minItems": 40,
    "maxItems": 40,
}


def throughput(llm, prompts, params) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def compile_times() -> list[tuple[str, float]]:
    """Each test schema compiled by a fresh compiler (nothing cached), in milliseconds; the
    first row is the one-time tokenizer preparation."""
    from engine.config import DEFAULT_MODEL
    from engine.grammar import GrammarCompiler
    from engine.loader import load_model_source
    from engine.structured_outputs import StructuredOutputsParams
    from tests.structured_schemas import SCHEMAS

    source = load_model_source(DEFAULT_MODEL)
    compiler = GrammarCompiler(source.tokenizer, source.hf_config.vocab_size, [source.tokenizer.eos_token_id])
    start = time.perf_counter()
    compiler._library_compiler()
    rows = [("(tokenizer preparation, once per engine)", (time.perf_counter() - start) * 1000)]
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        compiler.compile(StructuredOutputsParams(json=schema))
        rows.append((name, (time.perf_counter() - start) * 1000))
    start = time.perf_counter()
    compiler.compile(StructuredOutputsParams(json=SCHEMAS["flat_required"]))
    rows.append(("(cached: the same schema again)", (time.perf_counter() - start) * 1000))
    compiler.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from engine import LLM, SamplingParams

    print("compiling the test schemas ...", flush=True)
    compiles = compile_times()
    for name, ms in compiles:
        print(f"  {name}: {ms:.1f} ms")

    print(f"loading {args.model} ...", flush=True)
    llm = LLM(args.model, num_threads=args.threads, max_num_seqs=CONCURRENCY, dtype=args.dtype)
    prompts = [llm.engine.apply_chat_template(c) for c in chat_prompts(CONCURRENCY)]
    plain = SamplingParams(temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True,
                                 structured_outputs={"json": LONG_SCHEMA})  # fmt: skip
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, structured_outputs={"json": LONG_SCHEMA}), use_tqdm=False)  # warm-up, compile
    results: dict[str, list[float]] = {"plain": [], "json": []}
    for r in range(args.rounds):
        for name, params in (("plain", plain), ("json", constrained)):
            results[name].append(throughput(llm, prompts, params))
            print(f"  round {r + 1}/{args.rounds} {name}: {results[name][-1]:.1f} tok/s", flush=True)
    best = {name: max(values) for name, values in results.items()}
    overhead = 1 - best["json"] / best["plain"]
    print(f"concurrency {CONCURRENCY}: {best['plain']:.1f} tok/s plain, {best['json']:.1f} tok/s with a JSON schema "
          f"on every request ({overhead:+.1%} slower; target at most 10%)")
    if not args.no_append:
        append_results(args, results, best, overhead, compiles)


def append_results(args, results, best, overhead, compiles) -> None:
    command = "python bench/bench_structured.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, {args.dtype}"
    lines = [
        f"\n## Structured outputs at concurrency {CONCURRENCY}, {args.max_tokens} tokens per request ({time.strftime('%Y-%m-%d')})\n",
        f"Command: `{command.strip()}`  \nMachine: {machine}; model {args.model}.\n",
        "| run | tok/s (best) | rounds |",
        "| --- | ---: | --- |",
        *(f"| {name} | {best[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |" for name, values in results.items()),
        f"\nJSON schema on every request: {overhead:+.1%} tok/s (target at most 10%).\n",
        "| schema | compile ms |",
        "| --- | ---: |",
        *(f"| {name} | {ms:.1f} |" for name, ms in compiles),
        f"\nMedian compile of the test schemas: {statistics.median(ms for _, ms in compiles[1:-1]):.1f} ms.\n",
    ]
    path = ROOT / "bench" / "RESULTS.md"
    with path.open("a") as f:
        f.write("\n".join(lines))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
