"""GGUF files of the new families load through transformers' GGUF reader: a tiny Qwen3 written
with the gguf package's writer (tokenizer copied from the default model's GGUF) generates the
same greedy tokens as the same weights loaded from safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import default_gguf_path
from tests.model_factories import make_tiny_checkpoint

gguf = pytest.importorskip("gguf")

# Hugging Face name (after "model.") -> GGUF name, per layer where it has {i}.
NAMES = {
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def add_default_tokenizer(writer) -> None:
    """The default model's tokenizer (the tiny checkpoints' vocabulary), copied from its GGUF."""
    source = gguf.GGUFReader(str(default_gguf_path()))
    for key, field in source.fields.items():
        if key.startswith("tokenizer.ggml."):
            value = field.contents()
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            else:
                writer.add_uint32(key, int(value))


def start_gguf(config, out: Path, arch: str):
    """A GGUF writer holding a Qwen3-shaped config's metadata and the default tokenizer."""
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    add_default_tokenizer(writer)
    return writer


def gguf_name(hf_name: str, names: dict = NAMES) -> str:
    parts = hf_name.removeprefix("model.").split(".")
    key = ".".join(["layers", "{i}", *parts[2:]]) if parts[0] == "layers" else ".".join(parts)
    return names[key].format(i=parts[1] if parts[0] == "layers" else "")


def finish_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_qwen3_gguf(checkpoint: str, out: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    writer = start_gguf(AutoConfig.from_pretrained(checkpoint), out, "qwen3")
    weights = load_file(str(Path(checkpoint) / "model.safetensors"))
    for hf_name, tensor in sorted(weights.items()):
        writer.add_tensor(gguf_name(hf_name), tensor.float().numpy())
    finish_gguf(writer)


@pytest.mark.slow  # transformers parses the GGUF's 49152-token vocabulary: ~30-70 s here
def test_a_qwen3_gguf_generates_what_its_safetensors_do(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTO_LLM_CACHE", str(tmp_path / "cache"))
    checkpoint = make_tiny_checkpoint(tmp_path, "Qwen3Config", tie_word_embeddings=True)
    path = tmp_path / "tiny-qwen3.gguf"
    write_qwen3_gguf(checkpoint, path)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = ["Hello, my name is", "The capital of France is"]
    from_gguf = LLM(str(path), num_kv_blocks=32, dtype="float32").generate(prompts, params, use_tqdm=False)
    from_safetensors = LLM(checkpoint, num_kv_blocks=32, dtype="float32").generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in from_gguf] == [o.prompt_token_ids for o in from_safetensors]
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_safetensors]
