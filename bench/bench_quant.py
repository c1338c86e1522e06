"""Weight formats side by side: resident memory and offline decode throughput.

    python bench/bench_quant.py                 # default model in bfloat16 / int8 / int4 / w8a8 / w4a8, then a
                                                # random Llama-3.2-3B-shaped checkpoint in int4
                                                # (groups of --group-size, 64 and 128)
    python bench/bench_quant.py --skip-3b --threads 2 --rounds 5
    python bench/bench_quant.py --only-3b       # the 3B-shaped checkpoint only (three group sizes, ~15 min on 2 cores)
    python bench/bench_quant.py --skip-3b --dtype float32   # the formats in a float32 engine (CPUs without
                                                # AVX512-BF16), against unquantized float32

Default model, speed: all four formats are loaded into ONE process (each engine with its own
--kv-mib KV cache, enough for 64 sequences), then timed in interleaved rounds: per round and
batch size (1, 16, 64 chat prompts, `--max-tokens` greedy tokens each, EOS ignored) every format
generates once, the order rotated each round (ABCD, BCDA, ...), so a machine whose speed drifts
between minutes slows every format of a round alike. Each round's output tokens/s is printed with
its ratio to bfloat16 in that round; the table gives each format's median tok/s and the median of
its per-round ratios. (Separate processes run one after another measured 30-50% drift on a
shared VM, more than the differences between formats.)
Default model, memory: resident memory is per process, so each format also loads alone in a
short process of its own with the engine's default 1 GiB KV cache, decodes a batch of 64 for 8
tokens, and reports weights, KV cache, other (libraries, Python and torch's runtime, tokenizer:
the engine's report), the process RSS after load and its peak during load, the RSS after that
decode, and the peak over the process (a prefill's activations included).
The 3B-shaped checkpoint (hidden 3072, 28 layers, 24/8 heads, intermediate 8192, vocabulary
128256, tied embeddings; random bfloat16 weights) is written once to --scratch; its int4 group
sizes run in a process each (memory and speed together); each batch size is warmed up with its own
prefill (the first 615-row prefill of a process took 10-23 s where the next took 2.4-2.7 s: one-time
costs the old single timing counted), then timed three ways: tok/s of the whole run, its prefill
alone (max_tokens=1), and decode tok/s (the tokens after each sequence's first over the run's time
past that prefill; batch 16 is 615 prompt tokens for 16 x 8 output tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp

LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0)


def write_3b_checkpoint(directory: Path) -> str:
    """Random bfloat16 weights in Llama-3.2-3B's shapes, one safetensors file per layer (so the
    writer never holds more than one layer), with the default model's tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from tests.helpers import default_tokenizer_dir

    if (directory / "model.safetensors.index.json").is_file():
        return str(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = LLAMA_3B
    config = LlamaConfig(**c, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).bfloat16()

    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    weight_map = {}
    shards = [("embed", {"model.embed_tokens.weight": rand(c["vocab_size"], h), "model.norm.weight": torch.ones(h).bfloat16()})]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shards.append((f"layer{n}", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h).bfloat16(), p + "post_attention_layernorm.weight": torch.ones(h).bfloat16(),
        }))
    for name, tensors in shards:
        save_file(tensors, directory / f"{name}.safetensors", metadata={"format": "pt"})
        weight_map.update({k: f"{name}.safetensors" for k in tensors})
        print(f"  wrote {name}", flush=True)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    for file in Path(default_tokenizer_dir()).iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return str(directory)


def run_one(spec: dict) -> dict:
    """In this process: load, then time each batch size."""
    import torch

    from bench.bench_offline import chat_prompts
    from engine import LLM, SamplingParams
    from engine.memory import process_memory

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    llm = LLM(spec["model"], dtype=spec["dtype"], quantization=spec["quantization"],
              quantization_group_size=spec["group_size"], num_threads=spec["threads"], max_num_seqs=64)
    memory = llm.engine.runner.model_runner.memory
    result = {"load_s": time.perf_counter() - start, **memory, "load_peak_rss": memory["peak_rss"]}
    engine = llm.engine
    prompts = [engine.apply_chat_template(c) for c in chat_prompts(64)]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1)
    for batch in spec["batches"]:
        llm.generate(prompts[:batch], first, use_tqdm=False)  # warm-up at this batch's prefill size (buffers, kernels)
        start = time.perf_counter()
        llm.generate(prompts[:batch], first, use_tqdm=False)  # the prefill alone (and its first token)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"tok_s@{batch}"] = tokens / elapsed
        # Decode alone: the tokens after each sequence's first over the time after the prefill. With
        # few tokens per sequence the prefill is a part of the run (the 3B's batch 16: 615 prompt
        # tokens for 16 x 8 output tokens) that runs at the matmuls' many-row speed, not a decode step's.
        result[f"prefill_s@{batch}"] = prefill
        result[f"decode_tok_s@{batch}"] = (tokens - batch) / (elapsed - prefill) if elapsed > prefill else float("nan")
        print(f"    batch {batch}: {result[f'tok_s@{batch}']:.1f} tok/s, prefill {prefill:.2f} s, "
              f"decode {result[f'decode_tok_s@{batch}']:.1f} tok/s", file=sys.stderr, flush=True)
    now = process_memory()  # after the last batch: decoding at concurrency max(batches)
    result["decode_rss"], result["peak_rss"] = now.get("VmRSS", 0), now.get("VmHWM", 0)
    return result


def in_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, dict]], batches: list[int]) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    base = rows[0][1]
    head = ("| format | weights MiB | KV MiB | other MiB | RSS after load MiB | load peak MiB | RSS after decode MiB | "
            "peak RSS MiB | " + " | ".join(f"tok/s @{b} | prefill s @{b} | decode tok/s @{b}" for b in batches) + " |")
    lines = [head, "|" + " --- |" * (8 + 3 * len(batches))]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |")
            continue
        speeds = []
        for b in batches:
            ratio = r[f"tok_s@{b}"] / base[f"tok_s@{b}"] if f"tok_s@{b}" in base else None
            speeds.append(f"{r[f'tok_s@{b}']:.1f}" + (f" ({ratio:.2f}x)" if ratio and r is not base else ""))
            speeds.append(f"{r[f'prefill_s@{b}']:.2f}")
            speeds.append(f"{r[f'decode_tok_s@{b}']:.1f}")
        weights = mib(r["weights"]) + (f" ({r['weights'] / base['weights']:.2f}x)" if r is not base else "")
        memory = [r["kv_cache"], r["other"] + r["libraries"], r["rss"], r["load_peak_rss"], r["decode_rss"], r["peak_rss"]]
        lines.append(f"| {name} | {weights} | " + " | ".join(map(mib, memory)) + " | " + " | ".join(speeds) + " |")
    return "\n".join(lines)


DEFAULT_MODEL = "SmolLM2-135M-Instruct"
FORMATS = (("unquantized", None), ("int8", "int8"), ("int4 (its Q4_1 blocks)", "int4"), ("w8a8", "w8a8"),
           ("w4a8 (its Q4_1 blocks)", "w4a8"))
BATCHES = (1, 16, 64)


def formats_here(dtype: str) -> tuple:
    """FORMATS (the unquantized one named by its dtype) less w8a8 and w4a8 where this CPU cannot
    run them (w8a8 needs AMX-INT8 or AVX512-VNNI, w4a8 AVX-512 with AVX512-VNNI: the engine refuses
    them)."""
    from engine.layers.quant_kernels import w4a8_kernels, w8a8_kernels

    missing = {method: why for method, kernels, why in (
        ("w8a8", w8a8_kernels, "neither AMX-INT8 nor AVX512-VNNI"), ("w4a8", w4a8_kernels, "no AVX-512 with AVX512-VNNI"))
        if kernels() is None}
    for method, why in missing.items():
        print(f"{method} left out: this CPU has {why}", flush=True)
    return tuple(f for f in ((dtype, None), *FORMATS[1:]) if f[1] not in missing)


def compare_in_process(args, formats) -> dict[str, dict[int, list[float]]]:
    """tok/s of every format at every batch size, per round: all engines in this process,
    formats interleaved (rotated) within each round and batch."""
    import torch

    from bench.bench_offline import chat_prompts
    from engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    engines = {}
    for name, quantization in formats:
        engines[name] = LLM(DEFAULT_MODEL, dtype=args.dtype, quantization=quantization or "none", num_threads=args.threads,
                            max_num_seqs=max(BATCHES), kv_cache_memory_bytes=args.kv_mib << 20)
    prompts = [engines[args.dtype].engine.apply_chat_template(c) for c in chat_prompts(max(BATCHES))]
    warm = SamplingParams(temperature=0.0, max_tokens=2)
    for llm in engines.values():  # kernels built and buffers sized for every row count timed
        for batch in BATCHES:
            llm.generate(prompts[:batch], warm, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    names = [name for name, _ in formats]
    speeds = {name: {b: [] for b in BATCHES} for name in names}
    for r in range(args.rounds):
        for batch in BATCHES:
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                outs = engines[name].generate(prompts[:batch], params, use_tqdm=False)
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                speeds[name][batch].append(tokens / (time.perf_counter() - start))
            base = speeds[args.dtype][batch][-1]
            print(f"  round {r + 1}, batch {batch}: " + ", ".join(
                f"{name} {speeds[name][batch][-1]:.1f} tok/s ({speeds[name][batch][-1] / base:.2f}x)" for name in names),
                flush=True)
    return speeds


def format_table(memory: dict[str, dict], speeds: dict[str, dict[int, list[float]]], batches) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    base_name = next(iter(speeds))
    base = memory[base_name]
    head = ("| format | weights MiB | KV MiB | other MiB | RSS after load MiB | load peak MiB | RSS after decode MiB | "
            "peak RSS MiB | " + " | ".join(f"tok/s @{b}" for b in batches) + " |")
    lines = [head, "|" + " --- |" * (8 + len(batches))]
    for name, runs in speeds.items():
        cells = []
        for b in batches:
            ratios = [t / t0 for t, t0 in zip(runs[b], speeds[base_name][b])]
            cells.append(f"{statistics.median(runs[b]):.1f}" + (f" ({statistics.median(ratios):.2f}x)" if name != base_name else ""))
        r = memory[name]
        if "error" in r or "error" in base:
            lines.append(f"| {name} | {r.get('error', '')} |" + " |" * 6 + " " + " | ".join(cells) + " |")
            continue
        weights = mib(r["weights"]) + (f" ({r['weights'] / base['weights']:.2f}x)" if name != base_name else "")
        columns = [r["kv_cache"], r["other"] + r["libraries"], r["rss"], r["load_peak_rss"], r["decode_rss"], r["peak_rss"]]
        lines.append(f"| {name} | {weights} | " + " | ".join(map(mib, columns)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the engines' dtype, and the unquantized baseline's (the default model's formats)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the default model's formats")
    parser.add_argument("--kv-mib", type=int, default=256, help="KV cache of each in-process engine (MiB)")
    parser.add_argument("--skip-3b", action="store_true")
    parser.add_argument("--only-3b", action="store_true", help="skip the default model's formats")
    parser.add_argument("--scratch", default="/tmp/bento-llm-bench-3b", help="where the 3B-shaped checkpoint is written")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    common = dict(threads=args.threads, group_size=args.group_size)
    if not args.only_3b:
        print("default model, memory: each format alone in a process ...", flush=True)
        memory = {}
        formats = formats_here(args.dtype)
        for name, quantization in formats:
            spec = dict(common, model=DEFAULT_MODEL, dtype=args.dtype, quantization=quantization or "none", max_tokens=8,
                        batches=[64])
            memory[name] = in_subprocess(spec)
        print("default model, speed: the formats in one process, interleaved rounds ...", flush=True)
        speeds = compare_in_process(args, formats)
        print(f"\n{DEFAULT_MODEL} (Q4_1 GGUF), {args.dtype}, {args.max_tokens} tokens per sequence, {args.threads} threads; "
              f"memory: each format alone with a 1 GiB KV cache; tok/s: one process, median of {args.rounds} "
              f"interleaved rounds (ratio: median of the per-round ratios to {args.dtype})\n")
        print(format_table(memory, speeds, BATCHES), flush=True)
    if args.skip_3b:
        return
    print("\nwriting the 3B-shaped checkpoint (once) ...", flush=True)
    path = write_3b_checkpoint(Path(args.scratch))
    rows = []
    # Scales and zeros in bfloat16: 5 bits per weight at group 32, 4.5 at 64 (Q4_K's rate), 4.25 at
    # 128 (GPTQ/AWQ's usual group).
    for group in sorted({args.group_size, 64, 128}):
        print(f"3B-shaped, int4 group {group} ...", flush=True)
        spec = dict(common, model=path, dtype="bfloat16", quantization="int4", group_size=group,
                    max_tokens=max(4, args.max_tokens // 4), batches=[1, 16])
        rows.append((f"int4 group {group}", in_subprocess(spec)))
    print("\nLlama-3.2-3B-shaped random checkpoint, int4 (embedding and tied head: int8 rows), 1 GiB KV cache\n")
    print(table(rows, [1, 16]))
    print("\nload (s): " + ", ".join(f"{name} {r['load_s']:.0f}" for name, r in rows if "load_s" in r))
    print("RSS after load (GB, 1e9 bytes; the target is 3.5): "
          + ", ".join(f"{name} {r['rss'] / 1e9:.2f}" for name, r in rows if "rss" in r))


if __name__ == "__main__":
    main()
