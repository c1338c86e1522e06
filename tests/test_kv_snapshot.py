"""The KV snapshot the dashboard draws: one state per block that agrees with the block manager's
counts, each request's blocks, cached prefixes after requests end; and AsyncEngine takes it on
its loop thread between steps, while requests run."""

from __future__ import annotations

import asyncio
import threading

from engine import AsyncEngine, EngineConfig, SamplingParams
from engine.kv_snapshot import kv_snapshot
from engine.llm_engine import LLMEngine

PROMPT = list(range(100, 140))  # 40 tokens: two full blocks of 16, shareable by a prefix hit


def test_block_states_agree_with_the_block_manager(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=32, enable_prefix_caching=True)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=20, ignore_eos=True)
    engine.add_request("a", PROMPT, SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=20, ignore_eos=True))
    engine.add_request("b", PROMPT + [7], params)
    for _ in range(3):
        engine.step()
    snapshot, usage = kv_snapshot(engine), engine.kv_cache_usage()
    states = snapshot["blocks"]
    assert len(states) == 32 and set(states) <= set("fcus")
    assert states.count("u") + states.count("s") == usage.num_used_blocks
    assert states.count("s") == usage.num_shared_blocks > 0  # n=2 shares its prompt, b hits a's prefix
    requests = {r["id"]: r for r in snapshot["requests"]}
    assert set(requests) == {"a", "b"} and requests["a"]["sequences"] == 2
    for request in requests.values():
        assert request["state"] == "running" and all(states[block] in "us" for block in request["blocks"])
    assert snapshot["stats"]["num_kv_blocks_used"] == usage.num_used_blocks
    while engine.has_unfinished_requests():
        engine.step()
    states = kv_snapshot(engine)["blocks"]
    assert set(states) <= set("fc") and states.count("c") >= 2  # the prompt's full blocks stay cached


def test_the_async_engine_takes_the_snapshot_on_its_loop_thread_between_steps(tiny_path, monkeypatch):
    import engine.async_engine as async_engine_module

    threads = []

    def on_loop(engine):
        threads.append(threading.current_thread().name)
        return kv_snapshot(engine)

    monkeypatch.setattr(async_engine_module, "kv_snapshot", on_loop)
    engine = AsyncEngine(EngineConfig(model=tiny_path, num_kv_blocks=32))

    async def run() -> list[dict]:
        stream = engine.add_request("r", PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
        snapshots = []
        async for out in stream:
            if len(out.outputs[0].token_ids) in (1, 20):
                snapshots.append(await engine.kv_snapshot())
        snapshots.append(await engine.kv_snapshot())  # idle: the loop wakes up to answer
        return snapshots

    try:
        during_first, during_later, idle = asyncio.run(run())
    finally:
        asyncio.run(engine.shutdown())
    assert threads == ["bento-llm-engine"] * 3
    assert [r["id"] for r in during_first["requests"]] == ["r"]
    assert len(during_later["requests"][0]["blocks"]) >= len(during_first["requests"][0]["blocks"]) >= 3
    assert idle["requests"] == [] and set(idle["blocks"]) <= set("fc")
