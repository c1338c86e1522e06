"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with Qwen's sparse MoE block, no shared expert."""

from __future__ import annotations

from engine.models.qwen2_moe import Qwen2MoeDecoderLayer, Qwen2MoeForCausalLM
from engine.models.qwen3 import Qwen3Attention


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    layer_class = Qwen3MoeDecoderLayer
