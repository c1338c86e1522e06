"""Qwen3 dense: Llama's layout with an RMSNorm over each query and key head before the rotary
embedding (q_norm, k_norm), and no q/k/v bias."""

from __future__ import annotations

from engine.layers.norm import RMSNorm
from engine.models.config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel_state import ParallelState


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__(config, layer_idx, parallel)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.norms_qk = True


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_class = Qwen3DecoderLayer
