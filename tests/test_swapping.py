"""Swapping: requests with several sequences go to the CPU pool and back, exactly."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.llm_engine import LLMEngine
from tests.conftest import assert_all_blocks_free

SAMPLES = SamplingParams(n=4, temperature=1.0, seed=21, max_tokens=20, ignore_eos=True)
BEAMS = SamplingParams(use_beam_search=True, best_of=4, temperature=0.0, max_tokens=20, ignore_eos=True)
# (request id, prompt, params): each needs about 9 blocks of 16 at its peak.
REQUESTS = [
    ("n4-a", list(range(100, 120)), SAMPLES),
    ("beam", list(range(300, 320)), BEAMS),
    ("n4-b", list(range(500, 520)), SAMPLES),
    ("single", list(range(700, 720)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
]


def run_all(engine: LLMEngine) -> tuple[dict[str, list[list[int]]], int]:
    for rid, prompt, params in REQUESTS:
        engine.add_request(rid, prompt, params)
    done, max_swapped = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
        max_swapped = max(max_swapped, engine.stats().num_swapped)
    return done, max_swapped


@pytest.fixture(scope="module")
def unconstrained(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=256)
    outputs, max_swapped = run_all(engine)
    assert max_swapped == 0 and engine.scheduler.num_preemptions == 0
    return outputs


def test_multi_sequence_requests_are_swapped_out_and_back_in_exactly(tiny_path, unconstrained):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=16)
    outputs, max_swapped = run_all(engine)
    assert engine.scheduler.num_swap_outs > 0 and max_swapped > 0
    assert outputs == unconstrained
    assert_all_blocks_free(engine)
    cpu = engine.swap_usage()
    assert cpu.num_used_blocks == 0 and cpu.num_free_blocks == cpu.num_blocks


def test_recompute_can_be_chosen_for_every_request(tiny_path, unconstrained):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=16, preemption_mode="recompute")
    outputs, max_swapped = run_all(engine)
    assert max_swapped == 0 and engine.scheduler.num_preemptions > 0
    assert outputs == unconstrained


def test_swap_can_be_chosen_for_single_sequence_requests(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=4, max_num_batched_tokens=64, preemption_mode="swap")
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = LLMEngine(model=tiny_path, num_kv_blocks=64)
    want, got = {}, {}
    for e, into in ((reference, want), (engine, got)):
        for i in range(4):
            e.add_request(f"r{i}", list(range(10 + i, 30 + i)), params)
        while e.has_unfinished_requests():
            for out in e.step():
                if out.finished:
                    into[out.request_id] = out.outputs[0].token_ids
    assert engine.scheduler.num_swap_outs > 0
    assert got == want
    assert engine.swap_usage().num_used_blocks == 0


def test_swapped_requests_come_back_before_new_ones_are_admitted(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=16)
    for rid, prompt, params in REQUESTS[:3]:
        engine.add_request(rid, prompt, params)
    added = admitted = False
    while engine.has_unfinished_requests():
        engine.step()
        if engine.scheduler.swapped and not added:
            engine.add_request("late", list(range(900, 910)), SamplingParams(temperature=0.0, max_tokens=4))
            added = True
        if added and not admitted and "late" in {g.request_id for g in engine.scheduler.running}:
            admitted = True
            assert not engine.scheduler.swapped  # every swapped request was back first
    assert added and admitted
    assert engine.swap_usage().num_used_blocks == 0


def test_aborting_a_swapped_request_frees_its_cpu_blocks(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=16)
    for rid, prompt, params in REQUESTS[:3]:
        engine.add_request(rid, prompt, params)
    while not engine.scheduler.swapped:
        engine.step()
    assert engine.swap_usage().num_used_blocks > 0
    for group in list(engine.scheduler.swapped):
        engine.abort_request(group.request_id)
    assert engine.swap_usage().num_used_blocks == 0
    for rid in list(engine.requests):
        engine.abort_request(rid)


def test_a_request_that_outgrew_the_whole_cache_fails_alone_instead_of_stalling_the_engine(tiny_path):
    """n=4 sequences of up to 64 tokens need 16 blocks; the cache has 8. Once swapped out the
    request can never come back: it fails with an error naming the fix, its blocks are freed, and
    a request queued behind it runs (before, the engine stepped forever doing nothing)."""
    from tests.test_engine_integrity import run

    engine = LLMEngine(model=tiny_path, num_kv_blocks=8, max_model_len=64, preemption_mode="swap")
    finished, errors = run(engine, {
        "wide": (list(range(100, 110)), SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=54, ignore_eos=True)),
        "after": (list(range(200, 210)), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
    }, max_steps=10_000)
    assert not engine.has_unfinished_requests()
    assert list(errors) == ["wide"] and "best_of" in str(errors["wide"])
    assert len(finished["after"].outputs[0].token_ids) == 8
    assert engine.swap_usage().num_used_blocks == 0
    assert_all_blocks_free(engine)
