"""GGUF files of the new families load through transformers' GGUF reader: a tiny checkpoint of
each family whose architecture the reader supports, written with the gguf package's writer
(gguf's own tensor-name map; the default model's GGUF tokenizer, cut to VOCAB_IN_FILE tokens),
generates the same greedy tokens as the same weights loaded from safetensors."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_files import moe_sizes_from_gguf_tensors
from tests.helpers import default_gguf_reader
from tests.model_factories import make_tiny_checkpoint
from tests.test_models_families import FAMILIES, MOE

gguf = pytest.importorskip("gguf")

# transformers model_type -> gguf architecture
ARCHITECTURES = {"qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "phi3": "PHI3", "gemma2": "GEMMA2",
                 "gemma3_text": "GEMMA3"}
_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


# Tokens of the default model's vocabulary a test file carries. Reading a GGUF's vocabulary costs
# transformers ~7 s per 49152 tokens each time it is read (config, tensors and tokenizer: three
# reads per load), and these tests feed token ids in, so the vocabulary's size tests nothing here.
# The model keeps all 49152 rows ({arch}.vocab_size); the tokenizer knows the first tokens only.
VOCAB_IN_FILE = 1024


@functools.cache
def default_tokenizer_fields() -> dict:
    """The default model's GGUF tokenizer fields, cut to VOCAB_IN_FILE tokens and the merges
    between them (read once per process: parsing the whole file takes seconds)."""
    source = default_gguf_reader()
    kept = set(source.fields["tokenizer.ggml.tokens"].contents()[:VOCAB_IN_FILE])
    fields = {}
    for key, field in source.fields.items():
        if key.startswith("tokenizer.ggml."):
            value = field.contents()
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                value = value[:VOCAB_IN_FILE]
            elif key == "tokenizer.ggml.merges":
                value = [m for m in value if set(m.split(" ")) | {m.replace(" ", "")} <= kept]
            fields[key] = value
    return fields


def start_gguf(config, out: Path):
    """A GGUF writer holding the config's metadata (as llama.cpp's converter writes it) and the
    default model's tokenizer, cut to its first VOCAB_IN_FILE tokens and the merges between them;
    returns it and gguf's tensor-name map for the architecture."""
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "num_experts", None):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    for key, value in default_tokenizer_fields().items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))
    return writer, gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def add_float_tensors(writer, names, config, weights: dict[str, torch.Tensor]) -> None:
    """Hugging Face tensors under their GGUF names, in float32; Gemma's norms stored as 1 + weight."""
    for hf_name, tensor in sorted(weights.items()):
        base, _, suffix = hf_name.rpartition(".")
        if config.model_type.startswith("gemma") and base.endswith("norm"):
            tensor = tensor + 1
        if base.endswith("shared_expert_gate"):  # a vector in the file, [1, hidden] in the model
            tensor = tensor[0]
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", tensor.float().numpy())


def finish_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(checkpoint: str, out: Path) -> None:
    """The checkpoint as llama.cpp's converter lays it out: experts stacked per projection."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    writer, names = start_gguf(config, out)
    weights = load_file(str(Path(checkpoint) / "model.safetensors"))
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name in [n for n in weights if _EXPERT.match(n)]:
        prefix, expert, proj = _EXPERT.match(name).groups()
        experts.setdefault(f"{prefix}.{proj}.weight", {})[int(expert)] = weights.pop(name)
    weights.update({name: torch.stack([w[e] for e in sorted(w)]) for name, w in experts.items()})
    add_float_tensors(writer, names, config, weights)
    finish_gguf(writer)


# What transformers' GGUF reader can say of each family: settings it maps no GGUF key to are left
# at its config defaults (Gemma's query scale and attention soft-cap, Gemma 3's layer pattern and
# per-layer rope, Phi-3's longrope and partial rotary), so the checkpoints use those values.
GEMMA = dict(head_dim=16, query_pre_attn_scalar=256, sliding_window=8)
CASES = {
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(FAMILIES["qwen3-moe"][1])),  # experts of a size the reader does not map
    # A shared expert beside them (no dense layers: the GGUF layout has none).
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=4, shared_expert_intermediate_size=64, **MOE)),
    "phi3": ("Phi3Config", {}),  # fused qkv and gate_up
    "gemma2": ("Gemma2Config", dict(GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, layer_types=["sliding_attention", "sliding_attention"])),
}


@pytest.mark.slow  # two engines and a GGUF written and converted: ~4 s a family on a loaded machine
@pytest.mark.parametrize("name", list(CASES))
def test_a_family_gguf_generates_what_its_safetensors_do(tmp_path, monkeypatch, name):
    config_class, overrides = CASES[name]
    checkpoint = make_tiny_checkpoint(tmp_path, config_class, **overrides)
    # The tiny GGUF's conversion goes to a throw-away cache; set only now, so that the default
    # tokenizer the checkpoint borrows (tests/helpers.py) comes from the usual cache, not from
    # a conversion of the whole default model when this module runs first in a process.
    monkeypatch.setenv("BENTO_LLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{name}.gguf"
    write_gguf(checkpoint, path)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = ["Hello, my name is", "The capital of France is"]
    from_safetensors = LLM(checkpoint, num_kv_blocks=32, dtype="float32").generate(prompts, params, use_tqdm=False)
    # Token ids in: transformers reads a Gemma GGUF's tokenizer as Gemma's, which the borrowed
    # GPT-2-style vocabulary is not (the default model's tests cover the GGUF tokenizer).
    token_ids = [o.prompt_token_ids for o in from_safetensors]
    from_gguf = LLM(str(path), num_kv_blocks=32, dtype="float32").generate(token_ids, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_safetensors]


def test_moe_sizes_the_gguf_reader_leaves_at_their_defaults_come_from_the_tensors():
    """transformers' reader returns experts stacked (experts.down_proj [E, H, I]) and maps no key to
    the expert or shared-expert width: both follow the tensors (the stacked layout itself loads as
    it is, tests/test_quant_moe.py)."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig()
    prefix = "model.layers.1.mlp"
    moe_sizes_from_gguf_tensors(config, {f"{prefix}.experts.gate_up_proj": torch.randn(3, 2 * 5, 4),
                                         f"{prefix}.experts.down_proj": torch.randn(3, 4, 5),
                                         f"{prefix}.shared_expert.down_proj.weight": torch.randn(4, 7),
                                         "model.norm.weight": torch.randn(4)})
    assert (config.moe_intermediate_size, config.shared_expert_intermediate_size) == (5, 7)
