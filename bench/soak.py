"""Soak test: minutes of mixed traffic against a running server, looking for what only time
and variety show: unexpected errors, latency creeping up, KV blocks that never come back,
worker memory that keeps growing.

    # against a running server (`bentoml serve` in the repo root)
    python bench/soak.py --url http://127.0.0.1:3000 --minutes 10 --concurrency 32 [--api-key KEY]
    # start `bentoml serve` itself (on 127.0.0.1), soak, stop it
    python bench/soak.py --launch --minutes 10 --concurrency 32

Each of --concurrency clients loops until time is up, picking a scenario at random: chat and
completion streams, non-streaming completions, n>1 samples, beam search, stop strings,
logprobs, clients that disconnect mid-stream, and bad requests (non-finite numbers, integers
too large, unknown fields) that must get a 400. Every outcome is classed; anything not
expected is an error. At the end it waits for the server to go idle and reads the KV blocks
still held from /metrics (must be 0). It prints a markdown summary for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bento_llm.testing import metric, scrape  # noqa: E402

WORDS = "the ocean lighthouse keeper quantum bread Roman honeybees robot paint mountain jazz volcano map city chess rain moon".split()
BAD_BODIES = [  # (path, raw JSON): each must be a 400
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}'),
    ("/v1/completions", '{"prompt": "x", "top_k": 9223372036854775808}'),
    ("/v1/completions", '{"prompt": "x", "seed": 18446744073709551616}'),
    ("/v1/completions", '{"prompt": "x", "repetition_penalty": 1e-300}'),
    ("/v1/completions", '{"prompt": "x", "use_beam_search": true, "n": 2, "temperature": 0, "length_penalty": 1e308}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "colour": "red"}'),
    ("/v1/completions", '{"prompt": "x", "max_tokens": -4}'),
]


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 40)))


def messages(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about {prompt(rng)}"}]


class Soak:
    def __init__(self, url: str, api_key: str | None, max_tokens: int) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_tokens = max_tokens
        self.outcomes: Counter = Counter()  # (scenario, class)
        self.latencies: list[tuple[float, float]] = []  # (seconds since start, latency) of completed requests
        self.start = time.monotonic()

    def record(self, scenario: str, outcome: str, began: float | None = None) -> None:
        self.outcomes[(scenario, outcome)] += 1
        if outcome == "ok" and began is not None:
            self.latencies.append((began - self.start, time.monotonic() - began))

    async def stream(self, client: httpx.AsyncClient, path: str, body: dict, stop_after: int | None = None) -> str:
        """'ok' for a stream that ended in [DONE] with no error event, 'disconnected' when we
        left early on purpose; anything else names what went wrong."""
        async with client.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                return f"http_{response.status_code}"
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "ok"
                if '"error"' in line and json.loads(line[6:]).get("error"):
                    return "error_event"
                events += 1
                if stop_after is not None and events >= stop_after:
                    return "disconnected"
            return "stream_cut"

    async def post(self, client: httpx.AsyncClient, path: str, body: dict) -> str:
        response = await client.post(path, json=body)
        if response.status_code != 200:
            return f"http_{response.status_code}"
        return "ok" if response.json().get("choices") else "no_choices"

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        max_tokens = rng.randint(8, self.max_tokens)
        scenario = rng.choices(
            ["chat_stream", "completion", "completion_stream", "n3", "beam", "stop", "logprobs", "disconnect", "bad"],
            weights=[20, 15, 10, 8, 6, 10, 8, 8, 15],
        )[0]
        began = time.monotonic()
        try:
            if scenario == "chat_stream":
                outcome = await self.stream(client, "/v1/chat/completions", {"messages": messages(rng), "max_tokens": max_tokens})
            elif scenario == "completion":
                outcome = await self.post(client, "/v1/completions", {"prompt": prompt(rng), "max_tokens": max_tokens, "ignore_eos": True})
            elif scenario == "completion_stream":
                outcome = await self.stream(client, "/v1/completions", {"prompt": prompt(rng), "max_tokens": max_tokens, "temperature": 0.7})
            elif scenario == "n3":
                outcome = await self.post(client, "/v1/chat/completions", {"messages": messages(rng), "n": 3, "temperature": 0.9, "seed": rng.randint(0, 2**63 - 1), "max_tokens": max_tokens})
            elif scenario == "beam":
                outcome = await self.post(client, "/v1/completions", {"prompt": prompt(rng), "n": 2, "best_of": 3, "use_beam_search": True, "temperature": 0, "max_tokens": min(max_tokens, 24)})
            elif scenario == "stop":
                outcome = await self.stream(client, "/v1/completions", {"prompt": prompt(rng), "stop": [" the", ".", "\n"], "temperature": 0.8, "max_tokens": max_tokens})
            elif scenario == "logprobs":
                outcome = await self.post(client, "/v1/completions", {"prompt": prompt(rng), "logprobs": 3, "max_tokens": max_tokens, "repetition_penalty": 1.2})
            elif scenario == "disconnect":
                outcome = await self.stream(client, "/v1/chat/completions", {"messages": messages(rng), "max_tokens": 200, "ignore_eos": True}, stop_after=rng.randint(1, 6))
                outcome = "ok" if outcome == "disconnected" else outcome
            else:
                path, raw = rng.choice(BAD_BODIES)
                response = await client.post(path, content=raw, headers={"content-type": "application/json"})
                error = response.json().get("error", {}) if response.headers.get("content-type", "").startswith("application/json") else {}
                outcome = "refused_400" if response.status_code == 400 and set(error) == {"message", "type", "param", "code"} else f"bad_got_{response.status_code}"
        except httpx.TimeoutException:
            outcome = "timeout"
        except httpx.HTTPError as e:
            outcome = type(e).__name__
        self.record(scenario, outcome, began if scenario not in ("bad", "disconnect") else None)

    async def client_loop(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=httpx.Timeout(300, connect=30)) as client:
            while time.monotonic() < deadline:
                await self.one(client, rng)


def worker_pid(url: str, given: int | None) -> int | None:
    """The BentoML worker that holds the model: of the processes listening on the server's
    port (the arbiter and its workers share the socket), the one using the most memory."""
    if given:
        return given
    port = urlparse(url).port
    best = None
    for proc in psutil.process_iter(["pid"]):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in proc.net_connections("tcp")):
                rss = proc.memory_info().rss
                if best is None or rss > best[1]:
                    best = (proc.pid, rss)
        except (psutil.Error, OSError):
            continue
    return best[0] if best else None


async def sample_memory(pid: int | None, start: float, every: float, samples: list, stop: asyncio.Event) -> None:
    process = psutil.Process(pid) if pid else None
    while not stop.is_set():
        if process is not None:
            try:
                samples.append((time.monotonic() - start, process.memory_info().rss / 2**30))
            except psutil.Error:
                process = None
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def blocks_at_idle(url: str, headers: dict, timeout: float = 60) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        values = await asyncio.to_thread(scrape, url, headers)
        used = metric(values, "bento_llm:kv_blocks_used")
        idle = metric(values, "vllm:num_requests_running") == 0 and metric(values, "vllm:num_requests_waiting") == 0
        if (used == 0 and idle) or time.monotonic() > deadline:
            return used
        await asyncio.sleep(0.5)


def summarize(soak: Soak, rss: list, blocks: float | None, minutes: float, concurrency: int, windows: int) -> str:
    expected = {"ok", "refused_400"}
    by_class: dict[str, int] = defaultdict(int)
    for (scenario, outcome), count in soak.outcomes.items():
        by_class[outcome if outcome in expected else f"UNEXPECTED {scenario}:{outcome}"] += count
    unexpected = sum(c for k, c in by_class.items() if k.startswith("UNEXPECTED"))
    total = sum(by_class.values())
    lines = [f"Soak: {minutes:g} min, concurrency {concurrency}, {total} requests, {unexpected} unexpected errors, "
             f"KV blocks held at idle: {blocks if blocks is None else int(blocks)}", "",
             "| outcome | requests |", "| --- | ---: |"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in sorted(by_class.items())]
    span = minutes * 60 / windows
    lines += ["", "| window (s) | completed | p50 latency (s) | p99 latency (s) | worker RSS (GiB, last) |", "| --- | ---: | ---: | ---: | ---: |"]
    for w in range(windows):
        lo, hi = w * span, (w + 1) * span
        lat = [latency for t, latency in soak.latencies if lo <= t < hi]
        mem = [gib for t, gib in rss if t < hi]
        p50, p99 = (f"{np.percentile(lat, 50):.2f}", f"{np.percentile(lat, 99):.2f}") if lat else ("-", "-")
        lines.append(f"| {lo:.0f}-{hi:.0f} | {len(lat)} | {p50} | {p99} | {f'{mem[-1]:.3f}' if mem else '-'} |")
    if rss:
        after_warmup = [gib for t, gib in rss if t >= minutes * 60 / windows]
        if after_warmup:
            lines += ["", f"Worker RSS: {rss[0][1]:.3f} GiB at start, {after_warmup[0]:.3f} after the first window, "
                      f"{max(after_warmup):.3f} peak, {rss[-1][1]:.3f} at the end."]  # fmt: skip
    return "\n".join(lines)


async def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while (await client.get(url.rstrip("/") + "/readyz")).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout} s")
            await asyncio.sleep(1)


async def run(args: argparse.Namespace, url: str) -> int:
    await wait_ready(url)
    soak = Soak(url, args.api_key, args.max_tokens)
    pid = worker_pid(url, args.worker_pid)
    print(f"soaking {url} for {args.minutes} min at concurrency {args.concurrency}; worker pid {pid}", file=sys.stderr)
    rss: list = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(pid, soak.start, args.rss_every, rss, stop))
    deadline = soak.start + args.minutes * 60
    await asyncio.gather(*(soak.client_loop(args.seed + i, deadline) for i in range(args.concurrency)))
    blocks = await blocks_at_idle(url, soak.headers)
    await asyncio.sleep(args.rss_every)  # one sample at idle
    stop.set()
    await sampler
    print(summarize(soak, rss, blocks, args.minutes, args.concurrency, args.windows))
    unexpected = sum(c for (_, o), c in soak.outcomes.items() if o not in ("ok", "refused_400"))
    return 0 if unexpected == 0 and blocks == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--launch", action="store_true", help="start `bentoml serve` on 127.0.0.1 for the run")
    parser.add_argument("--server-arg", action="append", default=[], help="KEY=VALUE passed as --arg to a launched server")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96, help="requests ask for 8..this many tokens")
    parser.add_argument("--windows", type=int, default=10, help="latency / RSS rows in the summary")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between worker RSS samples")
    parser.add_argument("--worker-pid", type=int, default=None, help="default: found from the listening port")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.launch:
        return asyncio.run(run(args, args.url))
    from bento_llm.testing import ServerProcess

    server_args = dict(item.split("=", 1) for item in args.server_arg)
    env = {"BENTO_LLM_API_KEY": args.api_key} if args.api_key else {}
    with ServerProcess(args=server_args, env=env, log_path="/tmp/bento-llm-soak-serve.log") as server:
        return asyncio.run(run(args, server.url))


if __name__ == "__main__":
    sys.exit(main())
