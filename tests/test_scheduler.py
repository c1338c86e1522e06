"""Continuous batching: who runs each step, chunked prefill, preemption, admission limits."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def drain(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def record_schedules(engine: LLMEngine) -> list[dict[str, int]]:
    """Every step's batch from now on, as request id -> query tokens."""
    steps: list[dict[str, int]] = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        steps.append({item.seq.request_id: item.num_new_tokens for item in out.scheduled})
        return out

    engine.scheduler.schedule = recording
    return steps


def test_long_prompt_prefills_in_chunks_while_others_decode(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64, max_num_batched_tokens=32)
    engine.add_request("short", "Hello there", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    engine.step()  # the short prompt is prefilled and now decodes
    steps = record_schedules(engine)
    long_prompt = list(range(100, 300))  # 200 tokens over a 32-token budget
    engine.add_request("long", long_prompt, GREEDY)
    done = drain(engine)
    prefill_steps = [s for s in steps if s.get("long", 0) > 1]
    assert len(prefill_steps) >= 200 // 32
    # Every step of the long prefill also ran the short request's decode, within the budget.
    assert all(s.get("short") == 1 for s in prefill_steps)
    assert all(sum(s.values()) <= 32 for s in steps)
    assert sum(s["long"] for s in prefill_steps) == len(long_prompt)  # 6 chunks of 31, then 14
    assert len(done["long"].outputs[0].token_ids) == GREEDY.max_tokens


def test_requests_join_and_leave_the_batch_every_step(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64)
    engine.add_request("a", "one two three", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    engine.add_request("b", "four five six", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    finished_at = {}
    step = 0
    while engine.has_unfinished_requests():
        if step == 1:
            engine.add_request("c", "seven eight", SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
                # Its blocks went back the same step.
                assert out.request_id not in engine.requests
        step += 1
    assert finished_at == {"a": 2, "c": 2, "b": 5}


def test_max_num_seqs_caps_the_running_batch(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64, max_num_seqs=2)
    for i in range(5):
        engine.add_request(f"r{i}", f"prompt number {i}", GREEDY)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    assert peak == 2


def record_preemptions(engine: LLMEngine) -> list[tuple[int, int]]:
    """Every step from now on: (requests the step's schedule took out of the running batch without
    finishing them, the schedule's own num_preempted). Only preemption leaves the running list
    inside schedule(); finished requests leave it after the step."""
    steps: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def recording():
        before = {id(g) for g in engine.scheduler.running}
        out = schedule()
        steps.append((len(before - {id(g) for g in engine.scheduler.running}), out.num_preempted))
        return out

    engine.scheduler.schedule = recording
    return steps


def test_preemption_recomputes_and_never_drops_a_request(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=4, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"r{i}", list(range(10 + i, 30 + i)), params)
    preemptions = record_preemptions(engine)
    done = drain(engine)
    assert sorted(done) == [f"r{i}" for i in range(6)]
    assert all(len(out.outputs[0].token_ids) == 20 for out in done.values())
    # The default "auto" mode recomputes single-sequence requests: nothing went to the CPU pool.
    assert engine.scheduler.num_swap_outs == 0 and engine.swap_usage().num_used_blocks == 0
    # Every preemption is counted once, in the step's output and in the engine's metric.
    taken_out = sum(n for n, _ in preemptions)
    assert taken_out > 0
    assert [n for n, _ in preemptions] == [reported for _, reported in preemptions]
    assert engine.scheduler.num_preemptions == engine.stats().num_preemptions == taken_out


def test_a_prompt_that_can_never_fit_is_rejected_when_added(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=4)  # 64 tokens of cache
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match="prompt has 80 tokens, but max_model_len is 64"):
        engine.add_request("big", list(range(80)), GREEDY)
    assert not engine.has_unfinished_requests()


def test_generation_stops_at_the_context_length(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64, max_model_len=40)
    engine.add_request("r", list(range(30)), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    out = drain(engine)["r"]
    assert len(out.outputs[0].token_ids) == 10
    assert out.outputs[0].finish_reason == "length"


def test_kv_usage_reports_used_free_shared_and_waste(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64)
    engine.add_request("r", list(range(20)), GREEDY)
    engine.step()
    usage = engine.kv_cache_usage()
    assert (usage.num_used_blocks, usage.num_free_blocks, usage.num_shared_blocks) == (2, 62, 0)
    assert usage.internal_waste == pytest.approx(12 / 32)
    drain(engine)
    assert engine.kv_cache_usage().num_used_blocks == 0


def run_to_the_end(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[list[int]]]:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    return {rid: [c.token_ids for c in out.outputs] for rid, out in drain(engine).items()}


def test_two_requests_swapped_out_in_one_step_and_back_in_one_step_come_back_exactly(tiny_path):
    """Found by mutation: the swap tests never moved two requests in one step, so a step keeping
    only the last request's block mapping (`=` for `+=`) passed. Here the n=4 request's first
    decode needs 3 copies of its shared, partly filled prompt block with 1 block free, so the two
    newest requests (one block each) are swapped out together, and they come back together when
    it finishes."""
    requests = [
        ("wide", list(range(100, 124)), SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)),
        *[(f"s{i}", list(range(200 + 10 * i, 205 + 10 * i)), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
          for i in range(1, 4)],
    ]
    want = run_to_the_end(LLMEngine(model=tiny_path, num_kv_blocks=64), requests)
    engine = LLMEngine(model=tiny_path, num_kv_blocks=6, preemption_mode="swap")
    moved: list[tuple[int, int, int]] = []  # per step: (requests swapped out, swapped in, out.num_preempted)
    schedule = engine.scheduler.schedule

    def recording():
        before = {id(g) for g in engine.scheduler.swapped}
        out = schedule()
        after = {id(g) for g in engine.scheduler.swapped}
        moved.append((len(after - before), len(before - after), out.num_preempted))
        return out

    engine.scheduler.schedule = recording
    assert run_to_the_end(engine, requests) == want
    assert max(out for out, _, _ in moved) == 2 and max(back for _, back, _ in moved) == 2
    assert all(out == preempted for out, _, preempted in moved)  # swap mode: every preemption swaps
    assert engine.scheduler.num_swap_outs == engine.scheduler.num_preemptions == sum(out for out, _, _ in moved)
    assert engine.swap_usage().num_used_blocks == 0


def test_a_request_whose_blocks_exactly_fill_the_cpu_pool_is_swapped(tiny_path):
    """The CPU pool holds 2 blocks: the younger of two requests in lockstep is preempted at 32
    tokens (2 full blocks) when the older took the last free block, and it fits the pool exactly."""
    requests = [(f"r{i}", list(range(20 + 30 * i, 40 + 30 * i)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
                for i in range(2)]
    reference = LLMEngine(model=tiny_path, num_kv_blocks=64)
    want = run_to_the_end(reference, requests)
    two_blocks = 2 * reference.runner.bytes_per_block / 2**30  # GiB, exact: a power-of-two division
    engine = LLMEngine(model=tiny_path, num_kv_blocks=5, preemption_mode="swap", swap_space=two_blocks)
    assert engine.swap_usage().num_blocks == 2
    assert run_to_the_end(engine, requests) == want
    assert engine.scheduler.num_swap_outs == 1 and engine.scheduler.num_preemptions == 1


def test_a_swapped_request_comes_back_when_it_needs_exactly_every_free_block(tiny_path):
    """Found by mutation (`>=` for `>` in _swap_in passed): a 2-block cache, two one-block prompts
    growing to two blocks in swap mode. The younger is swapped out with its one block when the
    older needs a second, and comes back once the older finishes, needing its block plus one to
    write into: every block of the cache. Refused, it would be failed as a request that outgrew
    the cache."""
    requests = [(f"r{i}", list(range(50 + 20 * i, 60 + 20 * i)), SamplingParams(temperature=0.0, max_tokens=22, ignore_eos=True))
                for i in range(2)]
    want = run_to_the_end(LLMEngine(model=tiny_path, num_kv_blocks=64), requests)
    engine = LLMEngine(model=tiny_path, num_kv_blocks=2, preemption_mode="swap")
    assert run_to_the_end(engine, requests) == want
    assert engine.scheduler.num_swap_outs == 1
