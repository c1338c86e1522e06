"""Serving benchmark in the manner of `vllm bench serve`.

Sends a stream of streaming (or, with --no-stream, plain) chat or completion requests to a running OpenAI-compatible
server, at a given request rate (Poisson arrivals) and/or under a maximum concurrency, and
prints request throughput, output tokens/s and TTFT, TPOT and ITL (mean, median, p99).

    # against a running server
    python bench/bench_serving.py --base-url http://127.0.0.1:3000 --num-prompts 64 \
        --max-tokens 128 --max-concurrency 16
    # start `bentoml serve` itself (on 127.0.0.1), run, stop it
    python bench/bench_serving.py --launch --server-arg num_threads=1 --max-concurrency 16
    # the baseline the targets are stated against: transformers' generate, one request at a time
    python bench/bench_serving.py --hf-baseline --num-prompts 4 --max-tokens 128
    # bfloat16 (fast on CPUs with AMX / AVX512-BF16): server and baseline in the same dtype
    python bench/bench_serving.py --launch --server-arg dtype=bfloat16 --max-concurrency 16
    python bench/bench_serving.py --hf-baseline --dtype bfloat16 --num-prompts 4
    # the weight formats side by side: one server per format, concurrency 1 (8 requests), 16 (32), 64 (64)
    python bench/bench_serving.py --formats none,int8,int4
    python bench/bench_serving.py --formats none,int8,int4 --format-rounds 3   # interleaved: ratios per round

Every request asks for exactly --max-tokens tokens (ignore_eos), as vLLM's random dataset
does, so runs compare like with like. Output tokens are counted from the server's usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = ["the ocean", "a lighthouse keeper", "quantum computers", "bread baking", "the Roman empire",
          "honeybees", "a robot learning to paint", "mountain climbing", "jazz music", "volcanoes",
          "the history of maps", "a city at night", "chess openings", "rain forests", "the moon landing",
          "a small bookshop"]  # fmt: skip
TASKS = ["Write a short story about {}.", "Explain {} to a ten-year-old.", "Write a poem about {}.",
         "List some surprising facts about {}.", "Describe a day in the life of someone obsessed with {}.",
         "Write a blog post introduction about {}."]  # fmt: skip


def make_prompts(n: int, seed: int) -> list[str]:
    """Varied, deterministic chat prompts (the machine has no dataset download)."""
    rng = random.Random(seed)
    pairs = [(task, topic) for task in TASKS for topic in TOPICS]
    rng.shuffle(pairs)
    return [pairs[i % len(pairs)][0].format(pairs[i % len(pairs)][1]) for i in range(n)]


@dataclass
class RequestResult:
    success: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def send(session: aiohttp.ClientSession, args: argparse.Namespace, prompt: str) -> RequestResult:
    stream = args.stream
    body: dict = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "stream": stream, "ignore_eos": True}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    if args.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with session.post(args.base_url + path, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return result
            if not stream:  # one JSON body at the end: no time to first token or gaps to measure
                usage = (await response.json())["usage"]
                result.prompt_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            else:
                async for raw in response.content:  # one SSE line at a time (an event may carry several tokens)
                    if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(raw[6:])
                    if "error" in chunk:
                        result.error = chunk["error"]["message"]
                        return result
                    if chunk.get("usage"):
                        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        result.output_tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content") if args.endpoint == "chat" else choice.get("text")
                        if not text:
                            continue  # the role chunk and the finish chunk carry no token
                        now = time.perf_counter()
                        if result.ttft == 0.0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
        result.latency = time.perf_counter() - start
        result.success = result.output_tokens > 0
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = repr(e)
    return result


async def run(args: argparse.Namespace, prompts: list[str], on_start: Callable[[], None] | None = None) -> tuple[list[RequestResult], float]:
    """Every prompt once, after one warm-up request; `on_start` is called when the timed part begins."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # The client shares the machine with the server, whose step threads lose every CPU-ms it takes:
    # with aiohttp's C parser it takes 0.04 ms per streamed token, with httpx 0.14-0.15 (A/B, c=64).
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        if args.model is None:
            async with session.get(args.base_url + "/v1/models") as response:
                args.model = (await response.json())["data"][0]["id"]
        print(f"model {args.model}: warm-up request ...", flush=True)
        warm = await send(session, args, prompts[0])
        if not warm.success:
            raise SystemExit(f"warm-up request failed: {warm.error}")
        semaphore = asyncio.Semaphore(args.max_concurrency or len(prompts))
        rng = np.random.default_rng(args.seed)

        async def limited(prompt: str) -> RequestResult:
            async with semaphore:
                return await send(session, args, prompt)

        print(f"{len(prompts)} requests, rate {args.request_rate}, max concurrency {args.max_concurrency}", flush=True)
        if on_start is not None:
            on_start()
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.success]
    ms = lambda xs: np.asarray(xs, dtype=float) * 1000  # noqa: E731
    streamed = [r for r in ok if r.ttft > 0]  # a non-streamed request has no first-token time
    ttft = ms([r.ttft for r in streamed])
    tpot = ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in streamed if r.output_tokens > 1])
    itl = ms([x for r in ok for x in r.itl])
    e2e = ms([r.latency for r in ok])
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def stats(name: str, values: np.ndarray) -> dict:
        if values.size == 0:
            return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
        return {f"mean_{name}_ms": float(values.mean()), f"median_{name}_ms": float(np.median(values)),
                f"p99_{name}_ms": float(np.percentile(values, 99))}  # fmt: skip

    return {
        "endpoint": args.endpoint, "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
        "max_tokens": args.max_tokens, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5], "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        **stats("ttft", ttft), **stats("tpot", tpot), **stats("itl", itl), **stats("e2el", e2e),
    }  # fmt: skip


def print_summary(s: dict) -> None:
    line = lambda k, v: print(f"{k:<40}{v:<10.2f}" if isinstance(v, float) else f"{k:<40}{v}")  # noqa: E731
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    line("Successful requests:", s["completed"])
    line("Failed requests:", s["failed"])
    line("Maximum request concurrency:", s["max_concurrency"])
    line("Benchmark duration (s):", s["duration_s"])
    line("Total input tokens:", s["total_input_tokens"])
    line("Total generated tokens:", s["total_output_tokens"])
    line("Request throughput (req/s):", s["request_throughput"])
    line("Output token throughput (tok/s):", s["output_throughput"])
    line("Total Token throughput (tok/s):", s["total_token_throughput"])
    for title, key, label in (("Time to First Token", "ttft", "TTFT"), ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                              ("Inter-token Latency", "itl", "ITL"), ("End-to-end Latency", "e2el", "E2EL")):  # fmt: skip
        print("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            value = s[f"{stat}_{key}_ms"]
            line(f"{stat.capitalize() if stat != 'p99' else 'P99'} {label} (ms):", value if value is not None else "n/a")
    print("=" * 50)
    for error in s["errors"]:
        print("error:", error)


FORMAT_SWEEP = [(1, 8), (16, 32), (64, 64)]  # (concurrency, requests)


def format_sweep(args: argparse.Namespace) -> None:
    """Issue 13's served table: each weight format in a server of its own (the other --server-arg
    settings shared), all started first and kept up (an idle server's threads sleep), then
    --format-rounds rounds in which every format meets the same requests at each concurrency, the
    formats' order rotated each round, so that a machine whose speed drifts between minutes slows
    every format of a round alike (formats run one after another minutes apart measured ratios
    that moved by 0.1 between runs). Per round: output tok/s and its ratio to the first format in
    that round; the table: each format's median tok/s, the median of its per-round ratios and its
    median TTFT. Every format's server is loaded at once: memory grows with the formats (the
    default model: ~1.6 GB each with its 1 GiB KV cache)."""
    from contextlib import ExitStack

    from bento_llm.testing import ServerProcess

    formats = args.formats.split(",")
    shared = dict(item.split("=", 1) for item in args.server_arg)
    runs: dict[tuple[str, int], list[dict]] = {}  # (format, concurrency) -> its rounds' summaries
    ratios: dict[tuple[str, int], list[float]] = {}
    with ExitStack() as stack:
        urls = {}
        for quantization in formats:  # started in turn: each load has the machine to itself
            server = stack.enter_context(ServerProcess(args={**shared, "quantization": quantization},
                                                       log_path=f"/tmp/bento-llm-bench-serve-{quantization}.log"))
            urls[quantization] = server.url
        for round_ in range(args.format_rounds):
            order = formats[round_ % len(formats):] + formats[:round_ % len(formats)]
            for concurrency, requests in FORMAT_SWEEP:
                args.max_concurrency, args.num_prompts = concurrency, requests
                this_round = {}
                for quantization in order:
                    args.base_url = urls[quantization]
                    results, duration = asyncio.run(run(args, make_prompts(requests, args.seed)))
                    this_round[quantization] = summary = summarize(results, duration, args)
                    runs.setdefault((quantization, concurrency), []).append(summary)
                base = this_round[formats[0]]["output_throughput"] or float("nan")
                for quantization in formats:
                    summary = this_round[quantization]
                    ratios.setdefault((quantization, concurrency), []).append(summary["output_throughput"] / base)
                    print(f"round {round_} {quantization} c={concurrency}: {summary['output_throughput']:.1f} tok/s "
                          f"({summary['output_throughput'] / base:.2f}x {formats[0]}), median TTFT "
                          f"{summary['median_ttft_ms']:.0f} ms, failed {summary['failed']}", flush=True)
    print(f"\n{args.endpoint}, {args.max_tokens} tokens, {args.format_rounds} interleaved round(s): median output tok/s "
          f"(median of the per-round ratios to {formats[0]}; their range) and median TTFT\n")
    print("| format | " + " | ".join(f"c={c} ({n} requests)" for c, n in FORMAT_SWEEP) + " |")
    print("| --- |" + " --- |" * len(FORMAT_SWEEP))
    for quantization in formats:
        cells = []
        for concurrency, _ in FORMAT_SWEEP:
            rounds, r = runs[(quantization, concurrency)], ratios[(quantization, concurrency)]
            tok_s = float(np.median([s["output_throughput"] for s in rounds]))
            ttft = float(np.median([s["median_ttft_ms"] for s in rounds]))
            spread = f"; {min(r):.2f}-{max(r):.2f}" if len(r) > 1 else ""
            cells.append(f"{tok_s:.1f} ({float(np.median(r)):.2f}x{spread}), {ttft:.0f} ms")
        print(f"| {quantization} | " + " | ".join(cells) + " |")


def hf_baseline(args: argparse.Namespace, prompts: list[str]) -> dict:
    """transformers' generate, one request at a time, greedy, exactly max_tokens each."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.config import DEFAULT_MODEL
    from engine.loader import default_gguf_path, gguf_cache_dir, load_model_source

    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = args.model or DEFAULT_MODEL
    source = load_model_source(model_name)  # converts a GGUF once into an HF directory
    directory = gguf_cache_dir(default_gguf_path()) if model_name == DEFAULT_MODEL else source.path
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = source.tokenizer
    timings = []
    with torch.no_grad():
        # Warm-up, as the serving runs have: the first generate pays for lazy initialisation.
        warm = tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        model.generate(warm, max_new_tokens=8, do_sample=False)
        for i, prompt in enumerate(prompts):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False)
            timings.append((time.perf_counter() - start, out.shape[1] - ids.shape[1]))
            print(f"hf generate {i}: {timings[-1][1]} tokens in {timings[-1][0]:.2f} s", flush=True)
    total_time = sum(t for t, _ in timings)
    total_tokens = sum(n for _, n in timings)
    result = {"hf_baseline": True, "dtype": args.dtype, "threads": torch.get_num_threads(), "requests": len(prompts),
              "output_tokens": total_tokens, "duration_s": total_time, "output_throughput": total_tokens / total_time}  # fmt: skip
    print(f"transformers generate, one at a time ({args.dtype}, {result['threads']} threads): {result['output_throughput']:.2f} output tok/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:3000")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="non-streaming requests (one JSON body each): throughput and end-to-end latency only")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals; inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None, help="append the summary as one JSON line to this file")
    parser.add_argument("--label", default=None, help="a name stored with the result")
    parser.add_argument("--launch", action="store_true", help="start `bentoml serve` on 127.0.0.1 for the run")
    parser.add_argument("--server-arg", action="append", default=[], help="KEY=VALUE passed as --arg to a launched server")
    parser.add_argument("--hf-baseline", action="store_true", help="measure transformers' one-at-a-time generate instead")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for --hf-baseline")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="transformers' dtype for --hf-baseline (match the server's --server-arg dtype)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated quantizations (none, int8, int4, ...): launch one server per format and "
                             "run concurrency 1, 16 and 64 (8, 32 and 64 requests) against each; prints one table")
    parser.add_argument("--format-rounds", type=int, default=1,
                        help="with --formats: interleaved rounds (every format per concurrency, order rotated)")
    args = parser.parse_args()
    prompts = make_prompts(args.num_prompts, args.seed)

    if args.formats:
        if args.format_rounds < 1:
            parser.error("--format-rounds must be at least 1")
        if args.result_json or args.launch or args.hf_baseline:
            parser.error("--formats launches its own servers and prints one table: without --launch, --hf-baseline, --result-json")
        format_sweep(args)
        return
    if args.hf_baseline:
        summary = hf_baseline(args, prompts)
    elif args.launch:
        from bento_llm.testing import ServerProcess

        server_args = dict(item.split("=", 1) for item in args.server_arg)
        with ServerProcess(args=server_args, log_path="/tmp/bento-llm-bench-serve.log") as server:
            args.base_url = server.url
            results, duration = asyncio.run(run(args, prompts))
        summary = summarize(results, duration, args)
        print_summary(summary)
    else:
        results, duration = asyncio.run(run(args, prompts))
        summary = summarize(results, duration, args)
        print_summary(summary)
    if args.result_json:
        with open(args.result_json, "a") as f:
            f.write(json.dumps({"label": args.label, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}) + "\n")
        from plots import serving_plot  # bench/plots.py, beside this script

        with open(args.result_json) as f:
            serving_plot([json.loads(line) for line in f if line.strip()], Path(args.result_json).with_suffix(".png"))


if __name__ == "__main__":
    main()
