"""Offline throughput: the engine against transformers' generate, in the same run.

    python bench/bench_offline.py                     # 64 chat prompts x 128 tokens, default model
    python bench/bench_offline.py --num-prompts 16 --no-append

Baselines: transformers one request at a time (on a subset, extrapolated by tokens/s), and in
static batches of 8 (left-padded; every sequence runs to max_tokens, as ignore_eos does here).
Prints output tokens/s and ratios, peak KV usage and internal waste, and appends a table to
bench/RESULTS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402

TOPICS = [
    "the water cycle", "black holes", "how vaccines work", "the French revolution", "photosynthesis",
    "machine learning", "the stock market", "volcanoes", "the history of jazz", "quantum computing",
    "the Roman empire", "climate change", "how airplanes fly", "the human heart", "coffee brewing",
    "chess openings", "the moon landing", "recycling", "electric cars", "honey bees",
]
TASKS = ["Explain {} to a child.", "Write a short poem about {}.", "List three facts about {}.",
         "Summarize the key ideas of {}."]


def chat_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": TASKS[i % len(TASKS)].format(TOPICS[i % len(TOPICS)])}] for i in range(n)]


def run_engine(args, conversations):
    from engine import LLM, SamplingParams

    llm = LLM(args.model, num_threads=args.threads, max_num_seqs=args.max_num_seqs, dtype=args.dtype)
    engine = llm.engine
    prompts = [engine.apply_chat_template(c) for c in conversations]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up

    peak = {"blocks": 0, "waste": 0.0}
    step = engine.step

    def step_and_measure():
        outs = step()
        usage = engine.kv_cache_usage()
        if usage.num_used_blocks > peak["blocks"]:
            peak.update(blocks=usage.num_used_blocks, waste=usage.internal_waste)
        return outs

    engine.step = step_and_measure
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    engine.step = step
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(
        tokens=tokens, seconds=elapsed, tok_s=tokens / elapsed, prompts=prompts,
        peak_blocks=peak["blocks"], num_blocks=engine.block_manager.num_blocks, peak_waste=peak["waste"],
        block_size=engine.config.block_size, preemptions=engine.scheduler.num_preemptions,
    )


def load_hf(model_name: str, dtype: str):
    from transformers import AutoModelForCausalLM

    from engine.loader import load_model_source

    source = load_model_source(model_name)
    directory = Path(source.weight_files[0]).parent
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
    return model, source.tokenizer


@torch.inference_mode()
def run_hf(model, tokenizer, prompts: list[list[int]], batch_size: int, max_tokens: int) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad
        )
        tokens += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - start
    return dict(tokens=tokens, seconds=elapsed, tok_s=tokens / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-single-subset", type=int, default=4, help="prompts run one at a time by transformers")
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="of the engine and of transformers alike")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    conversations = chat_prompts(args.num_prompts)
    ours = run_engine(args, conversations)
    print(f"engine: {ours['tokens']} tokens in {ours['seconds']:.1f} s = {ours['tok_s']:.1f} tok/s")
    print(f"  peak KV: {ours['peak_blocks']}/{ours['num_blocks']} blocks of {ours['block_size']}, "
          f"internal waste at peak {ours['peak_waste']:.1%}, preemptions {ours['preemptions']}")
    rows = [("bento-llm engine (continuous batching)", ours, "")]
    if not args.no_hf:
        model, tokenizer = load_hf(args.model, args.dtype)
        prompts = ours["prompts"]
        run_hf(model, tokenizer, prompts[:1], 1, 4)  # warm-up
        single = run_hf(model, tokenizer, prompts[: args.hf_single_subset], 1, args.max_tokens)
        batched = run_hf(model, tokenizer, prompts, args.hf_batch_size, args.max_tokens)
        note = f"{args.hf_single_subset} of {args.num_prompts} prompts run, rate extrapolated"
        rows.append(("transformers generate, one at a time", single, note))
        rows.append((f"transformers generate, static batches of {args.hf_batch_size}", batched, ""))
        for name, r, _ in rows[1:]:
            print(f"{name}: {r['tok_s']:.1f} tok/s -> engine is {ours['tok_s'] / r['tok_s']:.2f}x")

    if not args.no_append:
        append_results(args, rows, ours)


def append_results(args, rows, ours) -> None:
    command = "python bench/bench_offline.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, {args.dtype}"
    lines = [
        f"\n## Offline throughput, {args.num_prompts} chat prompts x {args.max_tokens} tokens "
        f"({time.strftime('%Y-%m-%d')})\n",
        f"Command: `{command.strip()}`  \nMachine: {machine}; model {args.model}.\n",
        "| run | output tokens | seconds | tok/s | engine speed-up | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r, note in rows:
        lines.append(f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | "
                     f"{ours['tok_s'] / r['tok_s']:.2f}x | {note} |")
    lines.append(
        f"\nPeak KV usage {ours['peak_blocks']}/{ours['num_blocks']} blocks of {ours['block_size']} tokens; "
        f"internal waste at the peak {ours['peak_waste']:.1%}; {ours['preemptions']} preemptions.\n"
    )
    path = ROOT / "bench" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n\nEach section: the command, the machine, and numbers measured in one run.\n")
    with path.open("a") as f:
        f.write("\n".join(lines))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
