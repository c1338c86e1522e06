"""SmolLM3: Llama with the rotary embedding left out of some layers (no_rope_layers[i] == 0)."""

from __future__ import annotations

import torch

from engine.layers.rotary import RopeTable
from engine.models.config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel_state import ParallelState


class SmolLM3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__(config, layer_idx, parallel)
        no_rope = getattr(config.hf_config, "no_rope_layers", None)
        self.use_rope = bool(no_rope[layer_idx]) if no_rope else True

    def forward(self, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        qk, v = self.split_qkv(self.qkv_proj(x))
        if self.use_rope:
            rope.rotate_(qk)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v))


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    attention_class = SmolLM3Attention


class SmolLM3ForCausalLM(LlamaForCausalLM):
    layer_class = SmolLM3DecoderLayer
