"""Quantized MoE experts (quantization int8/int4 on CPU): each expert's gate+up and down held as
int8/int4 codes only, multiplied with the kernels the dense projections use, quantized as each
expert's tensors load.

The accuracy rule: the quantized engine in float32 is the model whose weights are the quantized
weights dequantized, so its greedy tokens equal transformers' float32 generate on exactly those
dequantized weights (every projection, router and expert: what the engine quantizes), token for
token under the near-tie rule (tests/greedy_reference.py). The embedding and LM head stay float
(embedding_quantization="none"; their int8 rows are tests/test_quantized_embedding.py's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention import AttentionBackend
from engine.forward_context import AttentionMetadata, forward_context
from engine.layers.moe import FusedMoE
from engine.layers.packed_weight import PackedQuantizedWeight
from engine.layers.quant import QuantizedWeight, quantize, quantize_blocks
from engine.layers.quant_kernels import amx_kernels
from engine.layers.quant_kernels import w4a8_kernels, w8a8_kernels
from tests.greedy_reference import Comparison, compare_greedy, hf_greedy
from tests.helpers import load_hf_reference
from tests.model_factories import make_tiny_checkpoint
from tests.test_models_families import reference_moe

gguf = pytest.importorskip("gguf")
GROUP = 32
MAX_TOKENS = 12
PROMPTS = ["Hello, my name is", "The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4,"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Four experts, two per token, over two layers; 64-wide experts so a TP2 rank's half is one group.
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         norm_topk_prob=True)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            config_class, overrides = MOE_FAMILIES[name]
            cache[name] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), config_class, **overrides)
        return cache[name]

    return get


@torch.no_grad()
def dequantized_reference(path: str, method: str):
    """transformers' model with every weight the engine quantizes replaced by its dequantized
    codes (quantize() per matrix: per expert, per projection; rows are quantized independently,
    so fusing gate with up or q with k and v changes no code)."""
    model = load_hf_reference(path)
    for name, param in model.named_parameters():
        if param.dim() < 2 or "embed_tokens" in name or "lm_head" in name:
            continue
        matrices = param.data.reshape(-1, *param.shape[-2:])
        for matrix in matrices:  # transformers stacks experts: [experts, rows, cols]
            matrix.copy_(quantize(matrix, method, GROUP).dequantize())
    return model


def moe_modules(llm: LLM) -> list[FusedMoE]:
    return [m for m in llm.engine.runner.model_runner.model.modules() if isinstance(m, FusedMoE)]


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_quantized_experts_generate_what_transformers_does_on_the_dequantized_weights(checkpoints, family, method):
    path = checkpoints(family)
    llm = LLM(path, num_kv_blocks=32, quantization=method, dtype="float32", embedding_quantization="none")
    assert all(m.quantized_w13 is not None and m.w13 is None for m in moe_modules(llm))
    reference = dequantized_reference(path, method)
    result = Comparison()
    for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False):  # batched: experts see uneven groups
        compare_greedy(out.outputs[0].token_ids, *hf_greedy(reference, out.prompt_token_ids, MAX_TOKENS), result)
    assert result.near_ties <= 1, result


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_experts_hold_only_their_codes_and_scales(checkpoints, method):
    """No float expert weight stays resident: the experts' tensors are the int8/int4 codes and one
    float32 scale per row (int8) or a scale and zero per group of 32 (int4), rows padded to the
    packing's multiple of 16 (float32 activations: no AMX layout)."""
    llm = LLM(checkpoints("qwen3-moe"), num_kv_blocks=16, quantization=method, dtype="float32")
    model = llm.engine.runner.model_runner.model
    assert not [n for n, _ in model.named_parameters() if ".experts." in n]
    hidden, inter, experts = 64, 64, 4
    expected = 0
    for rows, cols in ((2 * inter, hidden), (hidden, inter)):  # gate+up, down
        if method == "int8":
            expected += rows * cols + rows * 4
        else:
            padded = -(-rows // 16) * 16
            expected += padded * cols // 2 + (cols // GROUP) * padded * 2 * 4
    for moe in moe_modules(llm):
        buffers = dict(moe.named_buffers())
        assert all(not t.is_floating_point() for n, t in buffers.items() if n.endswith("qweight"))
        assert sum(t.numel() * t.element_size() for t in buffers.values()) == experts * expected
        float_bytes = experts * 3 * hidden * inter * 4
        assert experts * expected < float_bytes / (3.5 if method == "int8" else 5)
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def random_moe(gen, num_experts=6, hidden=64, inter=96) -> FusedMoE:
    moe = FusedMoE(num_experts, 3, hidden, inter, True, "silu", parallel=None)
    with torch.no_grad():
        moe.w13.copy_(torch.randn(moe.w13.shape, generator=gen) * 0.3)
        moe.w2.copy_(torch.randn(moe.w2.shape, generator=gen) * 0.3)
    return moe


def load_quantized(source: FusedMoE, method: str, dtype: torch.dtype) -> tuple[FusedMoE, FusedMoE]:
    """(source's experts loaded quantized, through the checkpoint loaders, one expert's tensor at a
    time; the float MoE of their dequantized codes)."""
    inter = source.w2.shape[2]
    moe = FusedMoE(source.num_experts, source.top_k, source.w13.shape[2], inter, True, "silu", parallel=None)
    moe = moe.to(dtype)
    moe.quantize_at_load(method, GROUP, "cpu")
    assert moe.w13.is_meta and moe.w2.is_meta  # the float stacks never get storage
    reference = FusedMoE(source.num_experts, source.top_k, source.w13.shape[2], inter, True, "silu", parallel=None)
    for e in range(source.num_experts):
        gate, up = source.w13.data[e, :inter], source.w13.data[e, inter:]
        moe.load_w13(moe.w13, gate, (e, "gate"))
        assert moe._held  # the gate waits for its up (they fuse into one matmul)
        moe.load_w13(moe.w13, up, (e, "up"))
        moe.load_w2(moe.w2, source.w2.data[e], (e, "down"))
        assert not moe._held  # nothing float is kept once an expert is packed
        with torch.no_grad():
            reference.w13[e] = quantize_blocks([gate, up], method, GROUP).dequantize()
            reference.w2[e] = quantize(source.w2.data[e], method, GROUP).dequantize()
    assert moe.finalize() == f"{method} experts" and moe.w13 is None
    assert all(isinstance(m, PackedQuantizedWeight) for m in [*moe.quantized_w13, *moe.quantized_w2])
    return moe, reference


@torch.no_grad()
def run_layer(moe: FusedMoE, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The layer's forward in a step of the plain-torch backend (no fused_moe: grouped by expert)."""
    meta = AttentionMetadata(*(torch.zeros(1),) * 4, max_query_len=1, all_decode=True)
    with forward_context(meta, AttentionBackend("torch", [], []), torch.zeros(1)):
        return moe(x, logits)


def skewed_logits(gen, tokens: int, experts: int) -> torch.Tensor:
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, 0] += 2.0  # expert 0 takes most tokens, the last one (nearly) none
    logits[:, -1] -= 4.0
    return logits


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_quantized_moe_layer_equals_the_per_token_loop_on_dequantized_experts(gen, method, tokens):
    moe, reference = load_quantized(random_moe(gen), method, torch.float32)
    x = torch.randn(tokens, 64, generator=gen)
    logits = skewed_logits(gen, tokens, 6)
    out = run_layer(moe, x, logits)
    torch.testing.assert_close(out, reference_moe(reference, x, logits), atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(amx_kernels() is None, reason="the AMX quantized matmuls need AMX-BF16")
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_bfloat16_quantized_experts_take_the_amx_kernels_and_stay_within_bfloat16_rounding(gen, method):
    """bfloat16 (the fast CPU dtype): expert groups of 5+ rows run the AMX kernels, fewer PyTorch's
    ops; both within bfloat16's rounding of the float32 loop on the same dequantized experts."""
    moe, reference = load_quantized(random_moe(gen), method, torch.bfloat16)
    assert all(m.amx for m in moe.quantized_w13)
    x = torch.randn(48, 64, generator=gen)
    logits = skewed_logits(gen, 48, 6)
    out = run_layer(moe, x.bfloat16(), logits)
    expected = reference_moe(reference, x.bfloat16().float(), logits)
    assert (out.float() - expected).norm() / expected.norm() < 0.02


@pytest.mark.parametrize("method", [None, "int4"])
def test_stacked_expert_tensors_load_as_their_per_expert_slices(gen, method):
    """transformers' stacked names (a GGUF's converted copy: experts.gate_up_proj [E, 2I, H], gate
    rows then up rows; experts.down_proj [E, H, I]) load as the per-expert tensors would."""
    from engine.layers.moe import expert_param

    assert expert_param("model.layers.3.mlp.experts.gate_up_proj") == ("model.layers.3.mlp.experts.w13", None)
    assert expert_param("model.layers.3.mlp.experts.down_proj") == ("model.layers.3.mlp.experts.w2", None)
    source = random_moe(gen)
    stacked = FusedMoE(6, 3, 64, 96, True, "silu", parallel=None)
    stacked.quantize_at_load(method, GROUP, "cpu")
    stacked.load_w13(stacked.w13, source.w13.data.clone(), None)
    stacked.load_w2(stacked.w2, source.w2.data.clone(), None)
    stacked.finalize()
    if method is None:
        assert torch.equal(stacked.w13, source.w13) and torch.equal(stacked.w2, source.w2)
        return
    per_expert, _ = load_quantized(source, method, torch.float32)
    x, logits = torch.randn(16, 64, generator=gen), skewed_logits(gen, 16, 6)
    assert torch.equal(run_layer(stacked, x, logits), run_layer(per_expert, x, logits))


@pytest.mark.skipif(w8a8_kernels() is None, reason="w8a8 needs AMX-INT8 or AVX512-VNNI")
def test_w8a8_experts_hold_int8_codes_and_stay_within_w8a8s_rounding(gen):
    """w8a8 experts: int8 codes times the per-token int8 input, as w8a8's dense projections
    (tests/test_quant.py): within 3% of the float32 loop on the same dequantized experts."""
    moe, reference = load_quantized(random_moe(gen), "w8a8", torch.bfloat16)
    assert all(m.w8a8 and m.qweight.dtype == torch.int8 for m in [*moe.quantized_w13, *moe.quantized_w2])
    x = torch.randn(48, 64, generator=gen)
    logits = skewed_logits(gen, 48, 6)
    out = run_layer(moe, x.bfloat16(), logits)
    expected = reference_moe(reference, x.bfloat16().float(), logits)
    assert (out.float() - expected).norm() / expected.norm() < 0.03


@pytest.mark.skipif(w4a8_kernels() is None, reason="w4a8 needs AVX-512 with AVX512-VNNI")
def test_w4a8_experts_hold_int4_codes_and_stay_within_w4a8s_rounding(gen):
    """w4a8 experts: int4 codes in w4a8 strips times each token's input rounded to int8 per group,
    as w4a8's dense projections (tests/test_w4a8.py): within 3% of the float32 loop on the same
    dequantized experts."""
    moe, reference = load_quantized(random_moe(gen), "w4a8", torch.float32)
    assert all(m.w4a8 and m.qweight.dtype == torch.uint8 for m in [*moe.quantized_w13, *moe.quantized_w2])
    x = torch.randn(48, 64, generator=gen)
    logits = skewed_logits(gen, 48, 6)
    out = run_layer(moe, x, logits)
    expected = reference_moe(reference, x, logits)
    assert (out - expected).norm() / expected.norm() < 0.03


def test_a_quantized_moe_model_on_the_triton_backend_is_refused_naming_quantization(checkpoints):
    with pytest.raises(ValueError, match="quantization='int4'.*Triton"):
        LLM(checkpoints("mixtral"), num_kv_blocks=16, quantization="int4", attention_backend="triton")


def test_experts_of_a_width_no_int4_group_divides_stay_float(gen):
    moe = FusedMoE(4, 2, 64, 40, True, "silu", parallel=None)  # 40 columns: no group of 32+
    moe.quantize_at_load("int4", GROUP, "cpu")
    assert moe.quantize_as is None and not moe.w13.is_meta
    assert moe.finalize() == "float experts" and moe.quantized_w13 is None


@pytest.mark.slow  # two engines, one with a second rank: ~35 s on a busy machine
def test_tp2_quantized_experts_match_one_process(checkpoints):
    """Each rank quantizes its half of every expert's intermediate dimension (a 32-column half
    of down_proj is one int4 group, as in one process), so the tokens match."""
    from tests.test_tensor_parallel import check_against_one_process

    llm = check_against_one_process(None, None, checkpoints("qwen3-moe"), 2, num_kv_blocks=64, quantization="int4",
                                    dtype="float32")
    try:
        (moe, *_) = moe_modules(llm)
        assert moe.quantized_w2[0].in_features == 32 and moe.w13 is None
    finally:
        llm.shutdown()


# ---- GGUF: a file's stacked expert blocks keep their codes ------------------------------------
GGUF_EXPERT_TYPES = {"ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q4_1", "ffn_down_exps": "Q8_0"}


def quantized_expert_tensors(gen: np.random.Generator, experts: int, hidden: int, inter: int, types: dict) -> dict:
    """GGUF name (layer 0) -> (raw blocks or float32 array [experts, rows, cols], type name)."""
    tensors = {}
    for name, type_name in types.items():
        shape = (experts, hidden, inter) if name == "ffn_down_exps" else (experts, inter, hidden)
        values = (gen.standard_normal(shape) * 0.2).astype(np.float32)
        raw = values if type_name == "F32" else gguf.quants.quantize(values, gguf.GGMLQuantizationType[type_name])
        tensors[f"blk.0.{name}.weight"] = (raw, type_name, shape)
    return tensors


def add_tensors(writer, tensors: dict) -> None:
    for name, (raw, type_name, shape) in tensors.items():
        if type_name == "F32":
            writer.add_tensor(name, raw)
        else:
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])


def dequantized(raw: np.ndarray, type_name: str) -> torch.Tensor:
    if type_name == "F32":
        return torch.from_numpy(raw)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])))


@pytest.mark.parametrize("down_type", ["Q8_0", "F32"])
def test_a_gguf_moe_files_stacked_expert_blocks_are_read_expert_by_expert(tmp_path, down_type):
    """Qwen3-MoE's ffn_{gate,up,down}_exps [experts, rows, cols] in Q4_0/Q4_1/Q8_0: each expert's
    rows come out under its per-expert name as the file's own codes (dequantizing exactly as gguf
    does); a type that does not map (F32 here) comes from the float copy, still per expert."""
    from engine.gguf_weights import weights_keeping_gguf_blocks
    from engine.loader import ModelSource
    from engine.models.config import ModelConfig
    from tests.test_models_gguf import finish_gguf
    from transformers import Qwen3MoeConfig

    experts, hidden, inter = 3, 64, 96
    tensors = quantized_expert_tensors(np.random.default_rng(0), experts, hidden, inter,
                                       {**GGUF_EXPERT_TYPES, "ffn_down_exps": down_type})
    path = tmp_path / "experts.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    add_tensors(writer, tensors)
    finish_gguf(writer)
    full = {name: dequantized(raw, t) for name, (raw, t, _) in tensors.items()}
    # What transformers' conversion holds: gate and up fused per expert, down as it is.
    float_copy = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.cat([full["blk.0.ffn_gate_exps.weight"],
                                                              full["blk.0.ffn_up_exps.weight"]], dim=1),
        "model.layers.0.mlp.experts.down_proj": full["blk.0.ffn_down_exps.weight"],
    }
    config = Qwen3MoeConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=experts, moe_intermediate_size=inter, vocab_size=128)
    config.architectures = ["Qwen3MoeForCausalLM"]
    source = ModelSource("tiny", str(path), config, None, None, _tensors=float_copy)
    read = dict(weights_keeping_gguf_blocks(source, ModelConfig.from_hf(config, str(path))))
    assert len(read) == 3 * experts
    for gguf_name, part in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
        for e in range(experts):
            block = read[f"model.layers.0.mlp.experts.{e}.{part}.weight"]
            expected = full[f"blk.0.{gguf_name}.weight"][e]
            if part == "down_proj" and down_type == "F32":
                assert isinstance(block, torch.Tensor) and torch.equal(block, expected)
                continue
            assert isinstance(block, QuantizedWeight) and block.group_size == 32
            scale = block.scale.abs().repeat_interleave(32, dim=1)  # Q4_1: (q - 8) * s + z rounds once more
            assert ((block.dequantize() - expected).abs() <= 1e-6 * scale + 1e-7 * expected.abs()).all()


def write_qwen3_moe_gguf(checkpoint: str, out, expert_types: dict) -> None:
    """A tiny Qwen3-MoE checkpoint as llama.cpp lays it out: experts stacked per layer in the given
    GGUF types, everything else float32, the default model's tokenizer (cut: test_models_gguf.VOCAB_IN_FILE)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tests.test_models_gguf import add_float_tensors, finish_gguf, start_gguf

    config = AutoConfig.from_pretrained(checkpoint)
    writer, names = start_gguf(config, out)
    weights = load_file(str(Path(checkpoint) / "model.safetensors"))
    for layer in range(config.num_hidden_layers):
        for name, part in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
            stacked = torch.stack([weights.pop(f"model.layers.{layer}.mlp.experts.{e}.{part}.weight")
                                   for e in range(config.num_experts)]).numpy()
            qtype = gguf.GGMLQuantizationType[expert_types[name]]
            writer.add_tensor(f"blk.{layer}.{name}.weight", gguf.quants.quantize(stacked, qtype), raw_dtype=qtype)
    add_float_tensors(writer, names, config, weights)
    finish_gguf(writer)


@pytest.mark.slow  # a GGUF written and converted, an int4 engine and transformers: a few seconds
def test_a_qwen3_moe_gguf_in_int4_keeps_its_expert_blocks_and_generates_as_its_dequantized_copy(tmp_path, monkeypatch):
    """Experts in Q4_0 (gate, up) and Q4_1 (down) are int4 group 32 exactly: the engine in int4
    generates what transformers does on the file's dequantized float copy, with the float32
    projections (attention, router) replaced by their int4 codes dequantized."""
    from engine.loader import gguf_cache_dir
    from engine.models.base import CausalLM

    monkeypatch.setenv("BENTO_LLM_CACHE", str(tmp_path / "cache"))
    checkpoint = make_tiny_checkpoint(tmp_path, "Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=96, norm_topk_prob=True, tie_word_embeddings=True)
    path = tmp_path / "tiny-qwen3-moe.gguf"
    write_qwen3_moe_gguf(checkpoint, path, {"ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q4_0", "ffn_down_exps": "Q4_1"})
    read = []
    load_weights = CausalLM.load_weights
    monkeypatch.setattr(CausalLM, "load_weights", lambda self, weights, *a, **k: load_weights(
        self, ((name, read.append((name, w)) or w) for name, w in weights), *a, **k))
    llm = LLM(str(path), num_kv_blocks=32, quantization="int4", dtype="float32", embedding_quantization="none")
    experts = [w for name, w in read if ".experts." in name]
    assert len(experts) == 2 * 3 * 4 and all(isinstance(w, QuantizedWeight) for w in experts)
    assert all(m.quantized_w13 is not None for m in moe_modules(llm))
    reference = load_hf_reference(gguf_cache_dir(path))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                param.copy_(quantize(param.data, "int4", GROUP).dequantize())
    result = Comparison()
    for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        compare_greedy(out.outputs[0].token_ids, *hf_greedy(reference, out.prompt_token_ids, MAX_TOKENS), result)
    assert result.near_ties <= 1, result
