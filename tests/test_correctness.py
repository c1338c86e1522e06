"""Greedy outputs equal transformers' token for token, whatever the batch composition."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from tests.greedy_reference import Comparison, compare_greedy, hf_greedy
from tests.helpers import load_hf_reference, make_tiny_llama

MAX_TOKENS = 24
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far away, there lived a king who had three daughters. "
    "The youngest was the cleverest of them all, and one day she",
    "1, 2, 3, 4,",
    "Ünïcödé and emoji 🎉 are",
]

VARIANTS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "llama3-rope": dict(
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64,
        )
    ),
    "head-dim-32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "qwen2-qkv-bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "llama-attn-mlp-bias": dict(attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """variant -> (checkpoint dir, transformers reference, reference greedy outputs per prompt)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            path = make_tiny_llama(tmp_path_factory.mktemp(variant), **VARIANTS[variant])
            ref = load_hf_reference(path)
            cache[variant] = (path, ref, {})
        return cache[variant]

    return get


def reference_for(entry, tokenizer, prompt: str):
    path, ref, outputs = entry
    if prompt not in outputs:
        ids = tokenizer.encode(prompt)
        outputs[prompt] = (ids, *hf_greedy(ref, ids, MAX_TOKENS))
    return outputs[prompt]


def check(outs, tokenizer, entry) -> Comparison:
    result = Comparison()
    for out in outs:
        ids, hf_tokens, hf_logits = reference_for(entry, tokenizer, out.prompt)
        assert out.prompt_token_ids == ids
        compare_greedy(out.outputs[0].token_ids, hf_tokens, hf_logits, result)
    # Near-ties must stay rare: float32 noise, not a systematic difference.
    assert result.near_ties <= max(1, result.num_sequences // 4), result
    return result


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def run_staggered(engine: LLMEngine, prompts: list[str], every: int = 3, params: SamplingParams = GREEDY):
    """Add one prompt every few steps while the earlier ones decode."""
    pending = list(enumerate(prompts))
    finished = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id[1:])] = out
        step += 1
    return [finished[i] for i in range(len(prompts))]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers_all_together(tiny_models, variant):
    entry = tiny_models(variant)
    llm = LLM(entry[0], num_kv_blocks=256)
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), llm.get_tokenizer(), entry)


@pytest.mark.parametrize("variant", ["gqa", "mqa-tied", "qwen2-qkv-bias"])
def test_greedy_matches_transformers_one_at_a_time(tiny_models, variant):
    entry = tiny_models(variant)
    llm = LLM(entry[0], num_kv_blocks=256)
    outs = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in PROMPTS]
    check(outs, llm.get_tokenizer(), entry)


@pytest.mark.parametrize("variant", ["gqa", "head-dim-32"])
def test_greedy_matches_transformers_arriving_staggered(tiny_models, variant):
    entry = tiny_models(variant)
    engine = LLMEngine(model=entry[0], num_kv_blocks=256)
    check(run_staggered(engine, PROMPTS), engine.tokenizer, entry)


@pytest.mark.parametrize("variant", ["gqa", "mqa-tied"])
def test_greedy_matches_transformers_under_preemption(tiny_models, variant):
    entry = tiny_models(variant)
    # 8 blocks of 16 tokens cannot hold all six sequences at once: the newest get preempted
    # and recomputed.
    engine = LLMEngine(model=entry[0], num_kv_blocks=8)
    outs = run_staggered(engine, PROMPTS * 2, every=1)
    assert engine.scheduler.num_preemptions > 0
    check(outs, engine.tokenizer, entry)


def test_greedy_matches_transformers_with_chunked_prefill(tiny_models):
    entry = tiny_models("gqa")
    # A 16-token budget splits every prompt longer than that into chunks.
    engine = LLMEngine(model=entry[0], num_kv_blocks=256, max_num_batched_tokens=16)
    check(run_staggered(engine, PROMPTS, every=2), engine.tokenizer, entry)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("variant", ["gqa", "mqa-tied", "qwen2-qkv-bias"])
def test_greedy_matches_transformers_on_both_cpu_backends(tiny_models, variant, backend):
    """The C++ kernels (the default on CPU) and the plain-torch ops, through mixed steps where
    prefills run beside decodes."""
    entry = tiny_models(variant)
    engine = LLMEngine(model=entry[0], num_kv_blocks=256, attention_backend=backend)
    assert engine.runner.model_runner.backend.name == backend
    check(run_staggered(engine, PROMPTS), engine.tokenizer, entry)
