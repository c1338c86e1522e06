"""KV memory sharing, measured: blocks used with and without sharing (n=4 samples, beam width
4), and time to first token for a repeated long system prompt with prefix caching on and off.

    python bench/bench_sharing.py                       # the default model
    python bench/bench_sharing.py --model PATH --prompt-len 512 --output-len 64

It also draws KV blocks in use at every step of the three block runs (bench/sharing_blocks.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from engine import DEFAULT_MODEL, SamplingParams
from engine.llm_engine import LLMEngine


def blocks_trace(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[int]:
    """Run the requests together; the KV blocks in use after every step."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)
    trace = []
    while engine.has_unfinished_requests():
        engine.step()
        trace.append(engine.kv_cache_usage().num_used_blocks)
    return trace


def blocks_report(model: str, prompt_len: int, output_len: int, num_kv_blocks: int, plot: str | None = None) -> dict:
    # Prefix caching off: only copy-on-write sharing inside a request is measured.
    engine = LLMEngine(model=model, num_kv_blocks=num_kv_blocks, enable_prefix_caching=False)
    prompt = [(7 * i + 11) % 30000 + 100 for i in range(prompt_len)]
    sample = SamplingParams(temperature=1.0, seed=0, max_tokens=output_len, ignore_eos=True)
    n4 = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=output_len, ignore_eos=True)
    beam = SamplingParams(use_beam_search=True, best_of=4, temperature=0.0, max_tokens=output_len, ignore_eos=True)
    traces = {
        "4 requests, nothing shared": blocks_trace(engine, [(prompt, sample)] * 4),
        "n=4 samples, prompt shared": blocks_trace(engine, [(prompt, n4)]),
        "beam search, width 4": blocks_trace(engine, [(prompt, beam)]),
    }
    if plot:
        from plots import kv_blocks_plot  # bench/plots.py, beside this script

        kv_blocks_plot(traces, plot, f"KV blocks over time: {prompt_len}-token prompt, {output_len} tokens out")
    unshared, shared_n4, shared_beam = (max(trace) for trace in traces.values())
    return {
        "prompt_len": prompt_len,
        "output_len": output_len,
        "unshared_blocks_4_seqs": unshared,
        "n4_blocks": shared_n4,
        "n4_fraction": round(shared_n4 / unshared, 3),
        "beam4_blocks": shared_beam,
        "beam4_fraction": round(shared_beam / unshared, 3),
    }


def ttft_report(model: str, system_len: int, repeats: int, num_kv_blocks: int) -> dict:
    system = [(13 * i + 5) % 30000 + 100 for i in range(system_len)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    result = {"system_prompt_len": system_len, "repeats": repeats}
    for caching in (False, True):
        engine = LLMEngine(model=model, num_kv_blocks=num_kv_blocks, enable_prefix_caching=caching)
        engine.add_request("warm", system + [1, 2, 3], params)  # fills the cache (when on)
        while engine.has_unfinished_requests():
            engine.step()
        ttfts = []
        for r in range(repeats):
            group = engine.add_request(f"q{r}", system + [200 + r, 300 + r, 400 + r, 500 + r], params)
            while engine.has_unfinished_requests():
                engine.step()
            ttfts.append(group.metrics.first_token_time - group.metrics.arrival_time)
        key = "caching_on" if caching else "caching_off"
        result[key] = {
            "ttft_median_s": round(statistics.median(ttfts), 4),
            "prefix_cache_hit_tokens": engine.stats().prefix_cache_hits,
            "prefix_cache_queried_tokens": engine.stats().prefix_cache_queries,
        }
    result["speedup"] = round(result["caching_off"]["ttft_median_s"] / result["caching_on"]["ttft_median_s"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--system-len", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--plot", default="bench/sharing_blocks.png", help="KV blocks over time (PNG); '' for none")
    args = parser.parse_args()
    report = {
        "model": args.model,
        "blocks": blocks_report(args.model, args.prompt_len, args.output_len, args.num_kv_blocks, args.plot),
        "ttft": ttft_report(args.model, args.system_len, args.repeats, args.num_kv_blocks),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
