"""Every registered family against transformers, on a tiny random checkpoint in float32: greedy
token ids equal generate's (the near-tie rule) alone, and batched with staggered arrivals,
chunked prefill, preemption and prefix-cache hits, on the torch, C++ and Triton backends (the
Triton kernels under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.layers.moe import FusedMoE
from engine.llm_engine import LLMEngine
from engine.models.registry import architecture_for_model_type, supported_architectures
from tests.conftest import assert_all_blocks_free
from tests.greedy_reference import Comparison, compare_greedy, hf_greedy
from tests.helpers import load_hf_reference
from tests.model_factories import make_tiny_checkpoint

MAX_TOKENS = 12
SHARED = "The history of the city goes back many centuries, to a small fishing village on the river bank where"
PROMPTS = [SHARED + " the first", "Hello, my name is", SHARED + " merchants", "def add(a, b):\n    return"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# One case (or more) per registered architecture (test_every_registered_architecture_has_a_case).
FAMILIES = {
    "llama3-rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    # Every layer slides (Mistral's one window for all layers); 20 tokens under prompts of up to 39.
    "mistral-window": ("MistralConfig", dict(sliding_window=20)),
    "qwen3": ("Qwen3Config", {}),
    "qwen2-yarn": ("Qwen2Config", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128))),
    # Long factors from position 32 on: the shared prompts' decodes cross it.
    "phi3-longrope": ("Phi3Config", dict(max_position_embeddings=512, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=32,
        short_factor=[1.0 + i / 16 for i in range(8)], long_factor=[2.0 + i / 4 for i in range(8)]))),
    "phi4-partial-rotary": ("Phi3Config", dict(partial_rotary_factor=0.5)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=4, shared_expert_intermediate_size=64, mlp_only_layers=[1], **MOE)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=4, norm_topk_prob=True, **MOE)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                      logits_scaling=2.0)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),
    # Windows of 8 tokens under prompts of up to 27: the sliding layer sees only its window.
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"], rope_parameters={
                                            "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                            "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6)})),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (checkpoint dir, reference greedy outputs per prompt ids)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config_class, overrides = FAMILIES[name]
            path = make_tiny_checkpoint(tmp_path_factory.mktemp(name), config_class, **overrides)
            cache[name] = (path, load_hf_reference(path), {})
        return cache[name]

    return get


def check(entry, outs) -> Comparison:
    _, ref, greedy = entry
    result = Comparison()
    for out in outs:
        key = tuple(out.prompt_token_ids)
        if key not in greedy:
            greedy[key] = hf_greedy(ref, list(key), MAX_TOKENS)
        compare_greedy(out.outputs[0].token_ids, *greedy[key], result)
    assert result.near_ties <= 1, result
    return result


def run(engine: LLMEngine, prompts: list[str], every: int) -> list:
    """Add one prompt every few steps while the earlier ones run; outputs in prompt order."""
    pending, done, step = list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{step}-{i}", prompt, GREEDY)
        done.update((out.request_id, out) for out in engine.step() if out.finished)
        step += 1
    return sorted(done.values(), key=lambda out: int(out.request_id.split("-")[1]))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_greedy_equals_transformers(family, name, backend):
    entry = family(name)
    # 6 blocks of 16 for four prompts of up to 27 tokens + 12: preemption; 16-token steps: chunked prefill.
    engine = LLMEngine(model=entry[0], num_kv_blocks=6, max_num_batched_tokens=16, attention_backend=backend)
    assert engine.runner.backend.name == backend
    check(entry, run(engine, PROMPTS, every=1))
    assert engine.scheduler.num_preemptions > 0
    check(entry, run(engine, PROMPTS[:1], every=1))  # alone, its prefix cached by the run above
    assert engine.block_manager.prefix_hits > 0


REFERENCE_ACTIVATIONS = {"silu": torch.nn.functional.silu,
                         "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def reference_moe(moe: FusedMoE, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, in float32 on the CPU: the obvious loop every fused op
    (the torch grouping here, the Triton kernel in tests/test_triton_moe.py) must equal."""
    x, w13, w2 = x.float().cpu(), moe.w13.float().cpu(), moe.w2.float().cpu()
    act = REFERENCE_ACTIVATIONS[moe.act_name]
    probs = router_logits.float().cpu().softmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, experts = probs[t].topk(moe.top_k)
        if moe.renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            gate, up = (x[t] @ w13[e].T).chunk(2)
            out[t] += w * ((act(gate) * up) @ w2[e].T)
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_moe_equals_the_per_token_loop_with_uneven_routing(gen, renormalize):
    from engine.attention import AttentionBackend
    from engine.forward_context import AttentionMetadata, forward_context

    moe = FusedMoE(num_experts=6, top_k=3, hidden_size=32, intermediate_size=24, renormalize=renormalize,
                   act="silu", parallel=None)
    with torch.no_grad():
        moe.w13.copy_(torch.randn(moe.w13.shape, generator=gen) * 0.3)
        moe.w2.copy_(torch.randn(moe.w2.shape, generator=gen) * 0.3)
    x = torch.randn(37, 32, generator=gen)
    logits = torch.randn(37, 6, generator=gen)
    logits[:, 0] += 3.0  # expert 0 is in almost every token's top 3; expert 5 never is
    logits[:, 5] -= 10.0
    backend = AttentionBackend("torch", [], [])
    meta = AttentionMetadata(*(torch.zeros(1),) * 4, max_query_len=1, all_decode=True)
    with torch.no_grad(), forward_context(meta, backend, torch.zeros(1)):
        torch.testing.assert_close(moe(x, logits), reference_moe(moe, x, logits), atol=1e-5, rtol=1e-5)


def test_every_registered_architecture_has_a_case():
    import transformers

    covered = {architecture_for_model_type(getattr(transformers, config_class).model_type)
               for config_class, _ in FAMILIES.values()}
    assert covered == set(supported_architectures())


# Every family on the Triton backend (~4 s each under the interpreter). Before the norms, rotary
# and silu-and-mul were Triton kernels (kernels/triton_pointwise.py), the families that differ from
# llama3-rope only in their RoPE scaling, partial or skipped rotary, or pre-fused checkpoints ran the
# same Triton kernels on the same shapes and were left out; now their widths (head_dim 96, NoPE
# layers) reach the per-token kernels, and running them all is cheaper than keeping that argument.
TRITON_FAMILIES = sorted(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRITON_FAMILIES)
def test_family_greedy_equals_transformers_on_the_triton_backend(family, name):
    """The Triton kernels (under the interpreter on CPU: attention with its window and soft-cap
    variants, the fused MoE) through prefill chunks and decodes, a preemption and a prefix hit."""
    pytest.importorskip("triton")
    entry = family(name)
    # 3 blocks of 16 for prompts of 22 and 5 tokens + 12: the second is preempted and recomputed.
    engine = LLMEngine(model=entry[0], num_kv_blocks=3, max_num_batched_tokens=16, attention_backend="triton")
    assert engine.runner.backend.name == "triton"
    check(entry, run(engine, PROMPTS[:2], every=1))
    assert engine.scheduler.num_preemptions > 0
    check(entry, run(engine, PROMPTS[:1], every=1))  # alone, its first block cached by the run above
    assert engine.block_manager.prefix_hits > 0


# The families whose decode steps differ in what a CUDA graph of them records: a window on every
# layer (freed blocks in the tables), q/k norms, the fused MoE, scaled residuals and logits, soft caps
# beside a window (the final cap in compute_logits, after the graph).
PADDED_DECODE_FAMILIES = ["mistral-window", "qwen3", "mixtral", "granite", "gemma2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PADDED_DECODE_FAMILIES)
def test_family_greedy_equals_transformers_through_the_padded_decode_step(family, name):
    """Decode steps through engine/cuda_graphs.py's padded step (static buffers, padding rows, the
    LM head after): what a captured graph replays on a GPU, run here uncaptured on the interpreter."""
    pytest.importorskip("triton")
    from engine.cuda_graphs import DecodeGraphs

    entry = family(name)
    engine = LLMEngine(model=entry[0], num_kv_blocks=3, max_num_batched_tokens=16, attention_backend="triton")
    runner = engine.runner.model_runner
    if runner.decode_graphs is None:  # on a GPU the engine captured its own
        runner.decode_graphs = DecodeGraphs.for_runner(runner)
    padded = []
    forward = runner.decode_graphs.forward
    runner.decode_graphs.forward = lambda size: padded.append(size) or forward(size)
    check(entry, run(engine, PROMPTS[:2], every=1))
    assert padded or runner.decode_graphs.replays  # decode steps took the padded path
    assert_all_blocks_free(engine)


def test_a_rope_type_that_depends_on_the_batch_is_refused_naming_the_field(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "LlamaConfig", rope_parameters=dict(rope_type="dynamic", factor=2.0,
                                                                                rope_theta=10000.0))
    with pytest.raises(ValueError, match=r"config field rope_parameters=.*'dynamic'.* is not supported"):
        LLMEngine(model=path, num_kv_blocks=8)
