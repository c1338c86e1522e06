"""What the HTTP side costs: the same chat requests through the offline engine and through a
launched `bentoml serve`, interleaved in one run, reported as served/offline throughput ratios.

    python bench/bench_served_overhead.py                      # 64 requests x 128 tokens, c=16 and c=64, 2 rounds
    python bench/bench_served_overhead.py --concurrency 64 --rounds 3 --server-arg dtype=float32
    python bench/bench_served_overhead.py --server-root /tmp/old-checkout --server-root .   # A/B two versions

The offline side is the bare engine: LLMEngine.step() in a loop on this process's main thread,
with at most c requests in flight (a finished one is replaced before the next step), greedy, exactly
--max-tokens tokens each (ignore_eos), on the prompts bench_serving.py sends, chat-templated by the
engine. The served side is bench_serving.py's client (streaming chat, one connection per request)
against a server built from the same settings. The two never run at once: the idle server waits on
an event and the idle offline engine has nothing to step. On a shared machine each number is noisy;
the ratio of neighbouring runs is what to read (rounds interleave offline and served runs).
CPU time per output token is steadier under load: the server's event loop (its main thread), the
whole server process, and the offline process (OpenMP threads spinning at barriers count too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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
    cpu = time.process_time()
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
    cpu_ms = (time.process_time() - cpu) / tokens * 1e3
    return {"output_tokens": tokens, "duration_s": seconds, "output_throughput": tokens / seconds, "cpu_ms": cpu_ms}


def worker_pid(server_pid: int) -> int:
    """The BentoML worker process (the one with the engine) under `bentoml serve`."""
    pending = [server_pid]
    while pending:
        pid = pending.pop()
        if b"_bentoml_impl.worker.service" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        for task in Path(f"/proc/{pid}/task").iterdir():
            pending += [int(child) for child in (task / "children").read_text().split()]
    raise RuntimeError("no BentoML worker process found")


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of the process's main thread (the server's event loop) and of all its threads."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(stat: Path) -> float:
        fields = stat.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    main = cpu(Path(f"/proc/{pid}/task/{pid}/stat"))
    return main, cpu(Path(f"/proc/{pid}/stat"))


def served_run(args: argparse.Namespace, prompts: list[str], concurrency: int, pid: int) -> dict:
    """bench_serving.py's summary, plus the worker's CPU time: its event loop's, and all of it."""
    args.max_concurrency = concurrency
    loop_before, total_before = thread_cpu_seconds(pid)
    results, duration = asyncio.run(run(args, prompts))
    loop_after, total_after = thread_cpu_seconds(pid)
    return {**summarize(results, duration, args), "loop_cpu_s": loop_after - loop_before, "cpu_s": total_after - total_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, action="append", default=None, help="repeatable; default 16 and 64")
    parser.add_argument("--rounds", type=int, default=2, help="offline/served pairs per concurrency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="KEY=VALUE, for the server and the offline engine alike")
    parser.add_argument("--server-root", action="append", default=None,
                        help="serve this checkout (repeatable: A/B of server versions in one run); default this one")
    parser.add_argument("--log", default="/tmp/bento-llm-bench-overhead", help="servers' logs: this prefix + -N.log")
    args = parser.parse_args()
    concurrencies = args.concurrency or [16, 64]

    from bento_llm.settings import load_settings
    from bento_llm.testing import REPO_ROOT, ServerProcess
    from engine import LLMEngine, SamplingParams

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the launched servers are stopped too
    server_args = dict(item.split("=", 1) for item in args.server_arg)
    roots = args.server_root or [str(REPO_ROOT)]
    texts = make_prompts(args.num_prompts, args.seed)
    # The client's settings, as bench_serving.py's command line would give them.
    client = argparse.Namespace(model=None, max_tokens=args.max_tokens, temperature=0.0, endpoint="chat", api_key=None,
                                request_rate=float("inf"), seed=args.seed, max_concurrency=None)  # fmt: skip
    rows = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(ServerProcess(args=server_args, cwd=root, log_path=f"{args.log}-{i}.log"))
                   for i, root in enumerate(roots)]  # fmt: skip
        pids = [worker_pid(server.proc.pid) for server in servers]
        engine = LLMEngine(load_settings(server_args).engine_config())
        prompts = [engine.apply_chat_template([{"role": "user", "content": text}]) for text in texts]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        offline_run(engine, prompts[:2], SamplingParams(temperature=0.0, max_tokens=8), 2)  # warm-up
        for c in concurrencies:
            for r in range(args.rounds):
                offline = offline_run(engine, prompts, params, c)
                for root, server, pid in zip(roots, servers, pids):
                    client.base_url = server.url
                    served = served_run(client, texts, c, pid)
                    if served["failed"]:
                        raise SystemExit(f"served run failed: {served['errors']}")
                    prompt_tokens = sum(len(p) for p in prompts)
                    if served["total_input_tokens"] != prompt_tokens:  # the same requests, or the ratio means nothing
                        print(f"warning: server saw {served['total_input_tokens']} prompt tokens, offline {prompt_tokens}")
                    ratio = served["output_throughput"] / offline["output_throughput"]
                    tokens = served["total_output_tokens"]
                    loop_us, cpu_ms = served["loop_cpu_s"] / tokens * 1e6, served["cpu_s"] / tokens * 1e3
                    rows.append((c, r, root, offline["output_throughput"], served["output_throughput"], ratio, loop_us, cpu_ms, offline["cpu_ms"]))
                    print(f"c={c} round {r} {root}: offline {offline['output_throughput']:.0f} tok/s, served "
                          f"{served['output_throughput']:.0f} tok/s, served/offline {ratio:.2f}; per output token the server's "
                          f"event loop took {loop_us:.0f} us of CPU, the server {cpu_ms:.2f} ms, the offline engine "
                          f"{offline['cpu_ms']:.2f} ms", flush=True)  # fmt: skip
    print(f"\n{args.num_prompts} streaming chat requests x {args.max_tokens} tokens, server args {server_args or 'defaults'}")
    print("| concurrency | round | server | offline tok/s | served tok/s | served/offline | event-loop CPU us/token | server CPU ms/token | offline CPU ms/token |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, r, root, off, srv, ratio, loop_us, cpu_ms, off_ms in rows:
        print(f"| {c} | {r} | {root} | {off:.0f} | {srv:.0f} | {ratio:.2f} | {loop_us:.0f} | {cpu_ms:.2f} | {off_ms:.2f} |")
    for c in concurrencies:
        for root in roots:
            ratios = [row[5] for row in rows if row[0] == c and row[2] == root]
            print(f"c={c} {root}: served/offline median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
