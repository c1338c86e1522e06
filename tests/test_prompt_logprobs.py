"""prompt_logprobs: each prompt token's logprob (and the top ones) under transformers' logits."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from tests.test_correctness import run_staggered

PROMPT = "A prompt long enough to be prefilled in several chunks when the token budget is small, and then some."


def expected(ref, prompt_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return ref(input_ids=torch.tensor([prompt_ids])).logits[0].float().log_softmax(-1)


def check(out, ref, k: int) -> None:
    ids = out.prompt_token_ids
    logprobs = expected(ref, ids)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry, row = out.prompt_logprobs[pos], logprobs[pos - 1]
        assert ids[pos] in entry
        assert set(entry) - {ids[pos]} <= set(row.topk(k).indices.tolist())
        assert len(entry) in (k, k + 1)
        for tid, value in entry.items():
            assert value == pytest.approx(float(row[tid]), abs=1e-4)


def test_prompt_logprobs_equal_transformers_log_softmax(tiny):
    path, ref = tiny
    llm = LLM(path, num_kv_blocks=64)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=3), use_tqdm=False)[0]
    check(out, ref, 3)
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_survive_chunked_prefill_and_prefix_cache_hits(tiny):
    path, ref = tiny
    # 16-token steps split the prompt; the first request fills the prefix cache, which the
    # second (asking for prompt logprobs) must not use, since cached positions compute no logits.
    engine = LLMEngine(model=path, num_kv_blocks=64, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    outs = run_staggered(engine, [PROMPT, PROMPT], every=20, params=SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert outs[1].num_cached_tokens > 0
    engine.add_request("with-logprobs", PROMPT, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    out = done["with-logprobs"]
    assert out.num_cached_tokens == 0
    check(out, ref, 2)
    assert out.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_prompt_logprobs_with_parallel_samples(tiny):
    path, ref = tiny
    llm = LLM(path, num_kv_blocks=64)
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3
    check(out, ref, 1)
