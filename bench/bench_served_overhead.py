"""What the HTTP side costs: the same chat requests through the offline engine and through a
launched `bentoml serve`, interleaved in one run, reported as served/offline throughput ratios.

    python bench/bench_served_overhead.py                      # 64 requests x 128 tokens, c=16 and c=64, 2 rounds
    python bench/bench_served_overhead.py --concurrency 64 --rounds 3 --server-arg dtype=float32

The offline side is the bare engine: LLMEngine.step() in a loop on this process's main thread,
with at most c requests in flight (a finished one is replaced before the next step), greedy, exactly
--max-tokens tokens each (ignore_eos), on the prompts bench_serving.py sends, chat-templated by the
engine. The served side is bench_serving.py's client (streaming chat, one connection per request)
against a server built from the same settings. The two never run at once: the idle server waits on
an event and the idle offline engine has nothing to step. On a shared machine each number is noisy;
the ratio of neighbouring runs is what to read (rounds interleave offline and served runs).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import make_prompts, run, summarize  # noqa: E402  (beside this script)


def offline_run(engine, prompts: list[list[int]], params, concurrency: int) -> dict:
    """Output tokens/s of the bare engine with at most `concurrency` requests in flight."""
    pending = list(enumerate(prompts))
    in_flight = tokens = 0
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(f"offline-{time.monotonic_ns()}-{i}", prompt, params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                tokens += sum(len(o.token_ids) for o in out.outputs)
    seconds = time.perf_counter() - start
    return {"output_tokens": tokens, "duration_s": seconds, "output_throughput": tokens / seconds}


def served_run(args: argparse.Namespace, prompts: list[str], concurrency: int) -> dict:
    args.max_concurrency = concurrency
    results, duration = asyncio.run(run(args, prompts))
    return summarize(results, duration, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, action="append", default=None, help="repeatable; default 16 and 64")
    parser.add_argument("--rounds", type=int, default=2, help="offline/served pairs per concurrency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="KEY=VALUE, for the server and the offline engine alike")
    parser.add_argument("--log", default="/tmp/bento-llm-bench-overhead.log", help="the server's log")
    args = parser.parse_args()
    concurrencies = args.concurrency or [16, 64]

    from bento_llm.settings import load_settings
    from bento_llm.testing import ServerProcess
    from engine import LLMEngine, SamplingParams

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the launched server is stopped too
    server_args = dict(item.split("=", 1) for item in args.server_arg)
    texts = make_prompts(args.num_prompts, args.seed)
    # The client's settings, as bench_serving.py's command line would give them.
    client = argparse.Namespace(model=None, max_tokens=args.max_tokens, temperature=0.0, endpoint="chat", api_key=None,
                                request_rate=float("inf"), seed=args.seed, max_concurrency=None)  # fmt: skip
    with ServerProcess(args=server_args, log_path=args.log) as server:
        client.base_url = server.url
        engine = LLMEngine(load_settings(server_args).engine_config())
        prompts = [engine.apply_chat_template([{"role": "user", "content": text}]) for text in texts]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        offline_run(engine, prompts[:2], SamplingParams(temperature=0.0, max_tokens=8), 2)  # warm-up
        rows = []
        for c in concurrencies:
            for r in range(args.rounds):
                offline = offline_run(engine, prompts, params, c)
                served = served_run(client, texts, c)
                if served["failed"]:
                    raise SystemExit(f"served run failed: {served['errors']}")
                prompt_tokens = sum(len(p) for p in prompts)
                if served["total_input_tokens"] != prompt_tokens:  # the same requests, or the ratio means nothing
                    print(f"warning: server saw {served['total_input_tokens']} prompt tokens, offline {prompt_tokens}")
                ratio = served["output_throughput"] / offline["output_throughput"]
                rows.append((c, r, offline["output_throughput"], served["output_throughput"], ratio, served["median_itl_ms"]))
                print(f"c={c} round {r}: offline {offline['output_throughput']:.0f} tok/s, served "
                      f"{served['output_throughput']:.0f} tok/s, served/offline {ratio:.2f}", flush=True)  # fmt: skip
    print(f"\n{args.num_prompts} streaming chat requests x {args.max_tokens} tokens, server args {server_args or 'defaults'}")
    print("| concurrency | round | offline tok/s | served tok/s | served/offline | served median ITL ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, r, off, srv, ratio, itl in rows:
        print(f"| {c} | {r} | {off:.0f} | {srv:.0f} | {ratio:.2f} | {itl:.1f} |")
    for c in concurrencies:
        ratios = [row[4] for row in rows if row[0] == c]
        print(f"c={c}: served/offline median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
