"""Beam search in the engine equals transformers' beam search; beams share blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import DEFAULT_MODEL, LLM, SamplingParams
from engine.llm_engine import LLMEngine
from tests.helpers import load_hf_reference

PROMPTS = ["Hello, my name is", "The capital of France is a city that", "1, 2, 3, 4,"]
# (beam width, length_penalty, early_stopping)
SETTINGS = [(4, 1.0, False), (3, 0.5, True), (4, 2.0, "never"), (2, -0.5, False), (4, 0.0, "never")]


def hf_beam(model, prompt_ids, width, length_penalty, early_stopping, max_new_tokens, stop_token=None):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width,
            length_penalty=length_penalty, early_stopping=early_stopping, max_new_tokens=max_new_tokens,
            eos_token_id=stop_token, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


def engine_beam(llm, prompt_ids, width, length_penalty, early_stopping, max_tokens, stop_token=None):
    params = SamplingParams(
        use_beam_search=True, best_of=width, temperature=0.0, length_penalty=length_penalty,
        early_stopping=early_stopping, max_tokens=max_tokens, ignore_eos=True,
        stop_token_ids=[stop_token] if stop_token is not None else None,
    )
    return llm.generate([prompt_ids], params, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("width, length_penalty, early_stopping", SETTINGS)
def test_beam_search_equals_transformers_on_a_tiny_model(tiny, width, length_penalty, early_stopping):
    path, ref = tiny
    llm = LLM(path, num_kv_blocks=256)
    tokenizer = llm.get_tokenizer()
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = engine_beam(llm, ids, width, length_penalty, early_stopping, 12)
        assert ours.token_ids == hf_beam(ref, ids, width, length_penalty, early_stopping, 12), prompt


@pytest.mark.parametrize("width, length_penalty, early_stopping", SETTINGS)
def test_beam_search_equals_transformers_when_beams_end_early(tiny, width, length_penalty, early_stopping):
    """A token the model likes is made the stop token, so hypotheses finish at different lengths."""
    path, ref = tiny
    llm = LLM(path, num_kv_blocks=256)
    tokenizer = llm.get_tokenizer()
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        free_run = hf_beam(ref, ids, width, length_penalty, early_stopping, 12)
        stop = free_run[3]
        theirs = hf_beam(ref, ids, width, length_penalty, early_stopping, 12, stop_token=stop)
        ours = engine_beam(llm, ids, width, length_penalty, early_stopping, 12, stop_token=stop)
        assert ours.token_ids == theirs, prompt
        assert ours.finish_reason in ("stop", "length")


def test_beams_share_blocks_and_pruned_beams_free_theirs(tiny):
    path, _ = tiny
    engine = LLMEngine(model=path, num_kv_blocks=64)
    prompt = list(range(300, 340))
    engine.add_request("beam", prompt, SamplingParams(use_beam_search=True, best_of=4, temperature=0.0,
                                                      max_tokens=20, ignore_eos=True))
    max_shared = 0
    while engine.has_unfinished_requests():
        engine.step()
        group = engine.requests.get("beam")
        if group is None:
            break
        usage = engine.kv_cache_usage()
        max_shared = max(max_shared, usage.num_shared_blocks)
        # Only live beams hold blocks: a pruned beam's blocks went back in the step that pruned it.
        assert usage.num_used_blocks == len({b for s in group.seqs for b in s.block_table})
        # Beams never hold more than their distinct blocks: the prompt's full blocks are shared.
        assert usage.num_used_blocks < sum(len(s.block_table) for s in group.seqs) or len(group.seqs) == 1
    assert max_shared >= len(prompt) // 16


def test_n_best_beams_are_returned_best_first(tiny):
    path, ref = tiny
    llm = LLM(path, num_kv_blocks=256)
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    params = SamplingParams(use_beam_search=True, n=3, best_of=4, temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([ids], params, use_tqdm=False)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    scores = [o.cumulative_logprob / len(o.token_ids) for o in outs]
    assert scores == sorted(scores, reverse=True)
    with torch.inference_mode():
        theirs = ref.generate(torch.tensor([ids]), do_sample=False, num_beams=4, num_return_sequences=3,
                              max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert [o.token_ids for o in outs] == [row[len(ids):].tolist() for row in theirs]


@pytest.mark.slow
def test_beam_search_equals_transformers_on_the_default_model(default_float32_llm):
    from engine.loader import load_model_source

    llm = default_float32_llm  # exact against transformers' float32
    ref = load_hf_reference(Path(load_model_source(DEFAULT_MODEL).weight_files[0]).parent)
    tokenizer = llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    for prompt in ["The capital of France is", "Write a haiku about the sea."]:
        ids = tokenizer.encode(prompt)
        theirs = hf_beam(ref, ids, 4, 1.0, False, 16, stop_token=eos)
        ours = engine_beam(llm, ids, 4, 1.0, False, 16, stop_token=eos)
        assert ours.token_ids == theirs, prompt
