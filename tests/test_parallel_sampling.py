"""Parallel sampling (n, best_of): samples share the prompt's blocks and copy on write."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine

BLOCK = 16


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(tiny_path, num_kv_blocks=256)


def blocks_for(num_tokens: int) -> int:
    return (num_tokens + BLOCK - 1) // BLOCK


def test_n4_shares_the_prompt_blocks_and_copies_at_most_one_block_per_sample(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64)
    prompt = list(range(200, 240))  # 2 full blocks and a half-filled one
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=30, ignore_eos=True))
    prompt_tokens_fed = 0
    copies = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        nonlocal prompt_tokens_fed
        prompt_tokens_fed += sum(i.num_new_tokens for i in out.scheduled if i.seq.num_output_tokens == 0)
        copies.extend(out.block_copies)
        return out

    engine.scheduler.schedule = recording
    shared_seen = 0
    while engine.has_unfinished_requests():
        engine.step()
        group = engine.requests.get("r")
        if group is None:
            break
        seqs = group.seqs
        if len(seqs) == 4:
            usage = engine.kv_cache_usage()
            full_prompt_blocks = len(prompt) // BLOCK
            # The prompt's full blocks once, plus each sample's own blocks (its copy of the
            # partly filled prompt block, or the original for the last writer, and what it generated).
            own = sum(blocks_for(s.num_computed_tokens) - full_prompt_blocks for s in seqs)
            if all(s.num_computed_tokens > len(prompt) for s in seqs):
                assert usage.num_used_blocks == full_prompt_blocks + own
            assert all(s.block_table[:full_prompt_blocks] == seqs[0].block_table[:full_prompt_blocks] for s in seqs)
            shared_seen = max(shared_seen, usage.num_shared_blocks)
    assert prompt_tokens_fed == len(prompt)  # the prompt is computed once for all four samples
    assert shared_seen >= 2
    # Only the shared, partly filled prompt block was ever copied: once by each sample but the last.
    assert len(copies) == 3 and len({src for src, _ in copies}) == 1


def test_diverging_samples_in_a_copied_block_score_as_each_sample_run_alone(tiny):
    """Every sample writes its first token into the prompt's shared, partly filled block, so
    all but one write into a copy: each sample's logprobs must equal transformers' on that
    sample's own tokens, as if it had been run alone with nothing shared."""
    path, reference = tiny
    engine = LLMEngine(model=path, num_kv_blocks=64)
    prompt = list(range(300, 340))  # 2 full blocks and a half-filled one
    params = SamplingParams(n=4, temperature=1.5, seed=3, max_tokens=10, ignore_eos=True, logprobs=1)
    engine.add_request("r", prompt, params)
    copies = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        copies.extend(out.block_copies)
        return out

    engine.scheduler.schedule = recording
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert len(copies) == 3  # the shared partial block, copied by each sample but the last writer
    samples = [c.token_ids for c in final.outputs]
    assert len({tuple(s[:2]) for s in samples}) == 4  # they diverge at once
    with torch.inference_mode():
        for completion in final.outputs:
            ids = torch.tensor([prompt + completion.token_ids])
            logprobs = reference(input_ids=ids).logits[0].float().log_softmax(-1)
            want = [float(logprobs[len(prompt) + i - 1, t]) for i, t in enumerate(completion.token_ids)]
            got = [entry[t] for entry, t in zip(completion.logprobs, completion.token_ids)]
            assert got == pytest.approx(want, abs=1e-4), completion.index


def test_n_samples_come_back_as_n_completions(llm):
    out = llm.generate("Tell me", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent draws


def test_seeded_samples_reproduce_whatever_the_batch(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    alone = llm.generate("The weather today", params, use_tqdm=False)[0]
    other = SamplingParams(n=2, temperature=0.8, max_tokens=7, ignore_eos=True)
    batch = llm.generate(["Other prompt", "The weather today", "And a third"], [other, params, other],
                         use_tqdm=False)
    assert [c.token_ids for c in batch[1].outputs] == [c.token_ids for c in alone.outputs]


def test_best_of_returns_the_n_best_by_cumulative_logprob(llm):
    all_four = llm.generate("Once upon", SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0].outputs
    best_two = llm.generate(
        "Once upon", SamplingParams(n=2, best_of=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs
    ranked = sorted(all_four, key=lambda c: -c.cumulative_logprob)
    assert [c.token_ids for c in best_two] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in best_two] == [0, 1]


def test_samples_that_stop_early_free_their_blocks_at_once(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64)
    engine.add_request("r", list(range(40)), SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=40,
                                                              ignore_eos=True, stop_token_ids=list(range(0, 49152, 3))))
    while engine.has_unfinished_requests():
        for out in engine.step():
            group = engine.requests.get("r")
            if group is not None:
                live = {b for s in group.seqs for b in s.block_table}
                assert engine.kv_cache_usage().num_used_blocks == len(live)
    assert out.finished and len(out.outputs) == 4
