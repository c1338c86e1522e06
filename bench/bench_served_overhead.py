"""What the HTTP side costs: the same chat requests through the offline engine and through a
launched `bentoml serve`, interleaved in one run, reported as served/offline throughput ratios.

    python bench/bench_served_overhead.py                      # 64 requests x 128 tokens, c=16 and c=64, 2 rounds
    python bench/bench_served_overhead.py --concurrency 64 --rounds 3 --server-arg dtype=float32
    python bench/bench_served_overhead.py --temperature 1.0               # sampled, as OpenAI clients send by default
    python bench/bench_served_overhead.py --server-root /tmp/old-checkout --server-root .   # A/B two versions
    python bench/bench_served_overhead.py --server-arg stream_interval=4    # 4 tokens per event (vLLM's --stream-interval)
    python bench/bench_served_overhead.py --variant stream_interval=4       # this checkout as it is, and with 4, in one run
    python bench/bench_served_overhead.py --no-stream      # non-streaming requests: one JSON body each

The offline side is the bare engine: LLMEngine.step() in a loop on this process's main thread,
with at most c requests in flight (a finished one is replaced before the next step), greedy (or at
--temperature), exactly --max-tokens tokens each (ignore_eos), on the prompts bench_serving.py
sends, chat-templated by the engine. The served side is bench_serving.py's client (streaming chat unless --no-stream,
one connection per request) against a server built from the same settings. The two never run at
once: the idle server waits on an event and the idle offline engine has nothing to step. On a shared machine each number is noisy;
the ratio of neighbouring runs is what to read (rounds interleave offline and served runs).
CPU time per output token, over the timed part only (not the warm-up request, which runs one
request at a time and once inflated the server's figure by ~0.8 ms/token at c=64): the server's by
thread group (its event loop; the engine's step thread with its OpenMP workers, spinning at
barriers included; the rest), the client's (this process: it shares the machine, and every
CPU-ms it takes is one the step threads lose), and the offline engine's. "Cores" is CPU seconds
per second: both runs can use at most the machine's, so on 2 vCPUs a server at 2.0 cores that is
slower than offline is losing its cores' time to waiting, not spending more work. The event loop's
time in the kernel is mostly its socket writes (one per stream per step). "Handoff" is the share of
a served run the step loop waited for the event loop to hand a step's outputs to the streams
(bento_llm:step_handoff_seconds_total): no step runs meanwhile, so it is lost from the step rate.
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
    wakeups = process_wakeups(os.getpid())
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
    cpu_s = time.process_time() - cpu
    wakeups = process_wakeups(os.getpid()) - wakeups
    return {"output_tokens": tokens, "duration_s": seconds, "output_throughput": tokens / seconds,
            "cpu_ms": cpu_s / tokens * 1e3, "cores": cpu_s / seconds, "wakeups": wakeups / tokens}  # fmt: skip


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


GROUPS = ("loop", "engine", "other")


def thread_counters(pid: int) -> dict[str, float]:
    """CPU seconds ("<group>") and wake-ups ("<group>_wakeups") of a process by thread group: its
    main thread (the event loop), the engine's step thread with the OpenMP workers it started
    (they inherit its name), the rest. A wake-up is a voluntary context switch: the thread slept
    (on a futex, in epoll, ...) and something woke it, taking a core from whoever ran there."""
    tick = os.sysconf("SC_CLK_TCK")
    counters = dict.fromkeys((*GROUPS, *(f"{g}_wakeups" for g in GROUPS), "loop_kernel", "loop_preempted"), 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rpartition(")")[2].split()
        group = "loop" if int(task.name) == pid else "engine" if name.startswith("bento-llm-engin") else "other"
        counters[group] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if group == "loop":  # its system time: mostly the socket writes, one per stream per step
            counters["loop_kernel"] += int(fields[12]) / tick
            # Involuntary switches: the scheduler took its core (e.g. for a client its write woke).
            counters["loop_preempted"] += int(status.partition("nonvoluntary_ctxt_switches:")[2].split()[0])
        counters[f"{group}_wakeups"] += int(status.partition("voluntary_ctxt_switches:")[2].split()[0])
    return counters


def process_wakeups(pid: int) -> int:
    return int(sum(v for k, v in thread_counters(pid).items() if k.endswith("_wakeups")))


def handoff_seconds(url: str) -> float:
    """The server's step loop's wait for its event loop so far (AsyncEngine's step_handoff_seconds)."""
    from bento_llm.testing import metric, scrape

    return metric(scrape(url), "bento_llm:step_handoff_seconds_total") or 0.0


def served_run(args: argparse.Namespace, prompts: list[str], concurrency: int, pid: int) -> dict:
    """bench_serving.py's summary, plus over the timed part (not the warm-up request): CPU seconds,
    the server's by thread group, all of it ("cpu_s"), and this process's, the client's ("client_s";
    the idle offline engine beside it takes none); and the seconds the server's step loop waited
    for its event loop to hand out the steps' outputs ("handoff_s": no step runs meanwhile)."""
    args.max_concurrency = concurrency
    before: dict[str, float] = {}

    def start() -> None:
        before.update(thread_counters(pid), client=time.process_time(), handoff=handoff_seconds(args.base_url))

    results, duration = asyncio.run(run(args, prompts, on_start=start))
    after = {**thread_counters(pid), "client": time.process_time(), "handoff": handoff_seconds(args.base_url)}
    cpu = {f"{key}_s" if not key.endswith(("_wakeups", "_preempted")) else key: after[key] - before[key] for key in after}
    return {**summarize(results, duration, args), **cpu, "cpu_s": sum(cpu[f"{g}_s"] for g in GROUPS),
            "wakeups": sum(cpu[f"{g}_wakeups"] for g in GROUPS)}


def extensions_dir() -> str:
    """Where torch builds this process's C++ extensions (its default when the variable is unset)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, action="append", default=None, help="repeatable; default 16 and 64")
    parser.add_argument("--rounds", type=int, default=2, help="offline/served pairs per concurrency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="both sides' sampling (0: greedy; 1.0: the OpenAI API's default when a client sends none)")
    parser.add_argument("--server-arg", action="append", default=[], help="KEY=VALUE, for the server and the offline engine alike")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming chat requests (one JSON body each)")
    parser.add_argument("--server-root", action="append", default=None,
                        help="serve this checkout (repeatable: A/B of server versions in one run); default this one")
    parser.add_argument("--variant", action="append", default=[],
                        help="KEY=VALUE[,KEY=VALUE...]: one more server, from this checkout, with these settings over "
                             "--server-arg's (repeatable: A/B of settings in one run; the offline engine keeps --server-arg's)")
    parser.add_argument("--log", default="/tmp/bento-llm-bench-overhead", help="servers' logs: this prefix + -N.log")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds a server may take to load (longer on a busy machine)")
    args = parser.parse_args()
    concurrencies = args.concurrency or [16, 64]

    from bento_llm.settings import load_settings
    from bento_llm.testing import REPO_ROOT, ServerProcess
    from engine import LLMEngine, SamplingParams

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the launched servers are stopped too
    server_args = dict(item.split("=", 1) for item in args.server_arg)
    # (label, checkout, settings) of each server: the roots with --server-arg's, then each variant.
    servers_to_start = [(root, root, server_args) for root in (args.server_root or [str(REPO_ROOT)])]
    for variant in args.variant:
        servers_to_start.append((variant, str(REPO_ROOT), {**server_args, **dict(item.split("=", 1) for item in variant.split(","))}))
    labels = [label for label, _, _ in servers_to_start]
    texts = make_prompts(args.num_prompts, args.seed)
    # The client's settings, as bench_serving.py's command line would give them.
    client = argparse.Namespace(model=None, max_tokens=args.max_tokens, temperature=args.temperature, endpoint="chat", api_key=None,
                                request_rate=float("inf"), seed=args.seed, max_concurrency=None, stream=args.stream)  # fmt: skip
    rows = []
    with contextlib.ExitStack() as stack:
        servers = []
        for i, (_, root, settings) in enumerate(servers_to_start):
            # Another checkout builds the C++ kernels from its own paths: in the same extensions
            # directory each load would rebuild over the other's (minutes each on a busy machine).
            env = {} if Path(root).resolve() == Path(REPO_ROOT).resolve() else {"TORCH_EXTENSIONS_DIR": f"{extensions_dir()}-server-{i}"}
            server = ServerProcess(args=settings, cwd=root, env=env, log_path=f"{args.log}-{i}.log").start()
            stack.callback(server.stop)
            server.wait_ready(args.ready_timeout)
            servers.append(server)
        pids = [worker_pid(server.proc.pid) for server in servers]
        engine = LLMEngine(load_settings(server_args).engine_config())
        prompts = [engine.apply_chat_template([{"role": "user", "content": text}]) for text in texts]
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True)
        offline_run(engine, prompts[:2], SamplingParams(temperature=0.0, max_tokens=8), 2)  # warm-up
        for c in concurrencies:
            for r in range(args.rounds):
                offline = offline_run(engine, prompts, params, c)
                for label, server, pid in zip(labels, servers, pids):
                    client.base_url = server.url
                    served = served_run(client, texts, c, pid)
                    if served["failed"]:
                        raise SystemExit(f"served run failed: {served['errors']}")
                    prompt_tokens = sum(len(p) for p in prompts)
                    if served["total_input_tokens"] != prompt_tokens:  # the same requests, or the ratio means nothing
                        print(f"warning: server saw {served['total_input_tokens']} prompt tokens, offline {prompt_tokens}")
                    tokens = served["total_output_tokens"]
                    row = {"c": c, "round": r, "server": label, "offline": offline["output_throughput"], "served": served["output_throughput"],
                           "ratio": served["output_throughput"] / offline["output_throughput"], "offline_ms": offline["cpu_ms"],
                           **{f"{g}_ms": served[f"{g}_s"] / tokens * 1e3 for g in ("cpu", "loop", "loop_kernel", "engine", "other", "client")},
                           "cores": served["cpu_s"] / served["duration_s"], "offline_cores": offline["cores"],
                           "handoff": served["handoff_s"] / served["duration_s"],
                           **{f"{g}_wakeups": served[f"{g}_wakeups"] / tokens for g in GROUPS},
                           "loop_preempted": served["loop_preempted"] / tokens,
                           "wakeups": served["wakeups"] / tokens, "offline_wakeups": offline["wakeups"]}  # fmt: skip
                    rows.append(row)
                    print(f"c={c} round {r} {label}: offline {row['offline']:.0f} tok/s, served {row['served']:.0f} tok/s, "
                          f"served/offline {row['ratio']:.2f}; CPU ms per output token: server {row['cpu_ms']:.2f} (event loop "
                          f"{row['loop_ms']:.3f}, of it in the kernel {row['loop_kernel_ms']:.3f}, engine {row['engine_ms']:.2f}, other threads {row['other_ms']:.3f}), client "
                          f"{row['client_ms']:.3f}, offline engine {row['offline_ms']:.2f}; step loop waiting on the event loop "
                          f"{row['handoff']:.1%} of the time, event loop preempted {row['loop_preempted']:.2f} times per output token; wake-ups per output token: server "
                          f"{row['wakeups']:.2f} (event loop {row['loop_wakeups']:.2f}, engine {row['engine_wakeups']:.2f}, "
                          f"other threads {row['other_wakeups']:.2f}), offline engine {row['offline_wakeups']:.2f}", flush=True)  # fmt: skip
    print(f"\n{args.num_prompts} {'streaming' if args.stream else 'non-streaming'} chat requests x {args.max_tokens} tokens, temperature {args.temperature}, "
          f"server args {server_args or 'defaults'}")
    print("CPU ms per output token over the timed part; cores: CPU seconds per second of it; wake-ups: voluntary context")
    print("switches per output token (server: event loop / engine + OpenMP / other threads); handoff: share of the")
    print("served run's time the step loop waited for the event loop to hand out a step's outputs")
    print("| concurrency | round | server | offline tok/s | served tok/s | served/offline | server CPU ms | event loop | "
          "event loop in the kernel | engine + OpenMP | other threads | server cores | client CPU ms | offline CPU ms | offline cores | "
          "server wake-ups | offline wake-ups | handoff |")  # fmt: skip
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for w in rows:
        print(f"| {w['c']} | {w['round']} | {w['server']} | {w['offline']:.0f} | {w['served']:.0f} | {w['ratio']:.2f} | {w['cpu_ms']:.2f} | "
              f"{w['loop_ms']:.3f} | {w['loop_kernel_ms']:.3f} | {w['engine_ms']:.2f} | {w['other_ms']:.3f} | {w['cores']:.2f} | {w['client_ms']:.3f} | "
              f"{w['offline_ms']:.2f} | {w['offline_cores']:.2f} | {w['wakeups']:.2f} ({w['loop_wakeups']:.2f} / "
              f"{w['engine_wakeups']:.2f} / {w['other_wakeups']:.2f}) | {w['offline_wakeups']:.2f} | {w['handoff']:.1%} |")  # fmt: skip
    for c in concurrencies:
        for label in labels:
            ratios = [w["ratio"] for w in rows if w["c"] == c and w["server"] == label]
            print(f"c={c} {label}: served/offline median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
