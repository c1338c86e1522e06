"""Where a serving process's memory goes under soak-like traffic, in one process: after each
round of concurrent mixed requests through an AsyncEngine (prompts tokenized on worker
threads, as the server does), the process RSS beside glibc's heap statistics (mallinfo2: bytes
the allocator holds from the system, of those in use and free, and mmapped chunks) and
Python's own allocated block count. RSS that grows with the allocator's *free* bytes is heap
fragmentation and arenas (malloc_trim gives it back); growth of in-use bytes or Python blocks
is a leak.

    python bench/rss_probe.py --rounds 40 --concurrency 16                    # as the server runs today
    MALLOC_ARENA_MAX=2 python bench/rss_probe.py --rounds 40 --concurrency 16  # fewer arenas
    python bench/rss_probe.py --rounds 40 --concurrency 16 --trim              # malloc_trim(0) after each round

Linux with glibc only (it reads mallinfo2). Not a test: numbers for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import AsyncEngine, EngineConfig, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402

WORDS = "the ocean lighthouse keeper quantum bread Roman honeybees robot paint mountain jazz volcano map city chess rain moon".split()
MALLINFO_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO_FIELDS]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = Mallinfo2


def sample() -> dict[str, float]:
    gc.collect()
    info = LIBC.mallinfo2()  # summed over every arena
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    mib = 2**20
    return {
        "rss": rss_pages * os.sysconf("SC_PAGE_SIZE") / mib,
        "heap": info.arena / mib,  # held from the system in arenas (not mmapped chunks)
        "in_use": info.uordblks / mib,
        "free": info.fordblks / mib,
        "mmapped": info.hblkhd / mib,
        "py_blocks": sys.getallocatedblocks() / 1e6,
    }


def request(rng: random.Random) -> tuple[str, SamplingParams]:
    words = rng.randint(3, 40) if rng.random() < 0.9 else rng.randint(200, 600)
    prompt = " ".join(rng.choices(WORDS, k=words))
    kind = rng.choice(["plain", "plain", "samples", "beam", "logprobs", "stop"])
    max_tokens = rng.randint(8, 40)
    if kind == "samples":
        return prompt, SamplingParams(n=2, temperature=0.8, max_tokens=max_tokens)
    if kind == "beam":
        return prompt, SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=max_tokens)
    if kind == "logprobs":
        return prompt, SamplingParams(temperature=0.7, logprobs=5, max_tokens=max_tokens)
    if kind == "stop":
        return prompt, SamplingParams(temperature=0.7, stop=["the", "moon"], max_tokens=max_tokens)
    return prompt, SamplingParams(temperature=0.7, max_tokens=max_tokens)


async def one(engine: AsyncEngine, request_id: str, prompt: str, params: SamplingParams) -> None:
    token_ids = await asyncio.to_thread(engine.tokenizer.encode, prompt)  # off the loop, as the server
    async for _ in engine.add_request(request_id, token_ids, params):
        pass


async def run(args) -> None:
    engine = AsyncEngine(EngineConfig(model=args.model))
    rng = random.Random(0)
    print(f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', '-')} trim={args.trim} model={args.model}")
    print("| round | s | RSS MiB | heap MiB | in use MiB | free MiB | mmapped MiB | py blocks (M) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    start = time.monotonic()
    for r in range(args.rounds):
        await asyncio.gather(*(one(engine, f"{r}-{i}", *request(rng)) for i in range(args.concurrency)))
        s = sample()
        line = f"| {r} | {time.monotonic() - start:.0f} | {s['rss']:.0f} | {s['heap']:.0f} | {s['in_use']:.0f} | {s['free']:.0f} | {s['mmapped']:.0f} | {s['py_blocks']:.3f} |"
        if args.trim:
            LIBC.malloc_trim(0)
            line += f" after trim: RSS {sample()['rss']:.0f}"
        print(line, flush=True)
    await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each round and report RSS after it")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
