"""Granite: Llama with four multipliers: on the embeddings, on each sublayer's output before it
joins the residual stream, as the attention scale, and (as a divisor) on the logits."""

from __future__ import annotations

import torch

from engine.layers.logits import LogitsProcessor
from engine.models.config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel_state import ParallelState


class GraniteAttention(LlamaAttention):
    def scale(self, config: ModelConfig) -> float:
        return config.hf_config.attention_multiplier


class GraniteDecoderLayer(LlamaDecoderLayer):
    attention_class = GraniteAttention

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__(config, layer_idx, parallel)
        self.residual_multiplier = config.hf_config.residual_multiplier

    def forward(self, x, residual, rope) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.residual_multiplier
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope) * m, residual)
        return self.mlp(h) * m, residual


class GraniteForCausalLM(LlamaForCausalLM):
    layer_class = GraniteDecoderLayer

    def make_logits_processor(self) -> LogitsProcessor:
        return LogitsProcessor(self.config.vocab_size, self.parallel, scale=1.0 / self.config.hf_config.logits_scaling)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids) * self.config.hf_config.embedding_multiplier
