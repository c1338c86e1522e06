"""Gemma 2 and Gemma 3 (text): GELU-tanh MLP, embeddings scaled by sqrt(hidden_size), (1 + w)
RMSNorms (folded into the weight at load), a norm after attention and another around the MLP,
query_pre_attn_scalar as the attention scale, and layer_types alternating sliding-window and
global attention. Gemma 2 soft-caps attention and final logits; Gemma 3 normalizes q and k per
head and gives sliding layers their own rope base.

Each layer's window comes from ModelConfig.layer_windows (its layer_types), as for every family."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.logits import LogitsProcessor
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_spec
from engine.models.config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel_state import ParallelState


def gemma_norm(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or config.hidden_size, config.rms_norm_eps, weight_offset=1.0)


class GemmaAttention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__(config, layer_idx, parallel)
        hf = config.hf_config
        self.layer_type = hf.layer_types[layer_idx]
        self.attn.soft_cap = getattr(hf, "attn_logit_softcapping", None)
        if getattr(hf, "model_type", "") != "gemma2":  # Gemma 3: per-head q/k norms
            self.q_norm = gemma_norm(config, config.head_dim)
            self.k_norm = gemma_norm(config, config.head_dim)
            self.norms_qk = True

    def scale(self, config: ModelConfig) -> float:
        return config.hf_config.query_pre_attn_scalar**-0.5


class GemmaDecoderLayer(LlamaDecoderLayer):
    attention_class = GemmaAttention

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__(config, layer_idx, parallel)
        self.input_layernorm = gemma_norm(config)
        self.post_attention_layernorm = gemma_norm(config)
        self.pre_feedforward_layernorm = gemma_norm(config)
        self.post_feedforward_layernorm = gemma_norm(config)

    def forward(self, x, residual, ropes) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, ropes[self.self_attn.layer_type]))
        h = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_class = GemmaDecoderLayer

    def make_norm(self, dim: int) -> RMSNorm:
        return gemma_norm(self.config, dim)

    def make_logits_processor(self) -> LogitsProcessor:
        cap = getattr(self.config.hf_config, "final_logit_softcapping", None)
        return LogitsProcessor(self.config.vocab_size, self.parallel, soft_cap=cap)

    def init_buffers(self, device: torch.device | None = None) -> None:
        """One rotary table per layer type (Gemma 3's sliding layers have their own base)."""
        hf, head_dim = self.config.hf_config, self.config.head_dim
        types = sorted(set(hf.layer_types))
        per_type = "rope_parameters" in hf.to_dict() and all(t in (hf.rope_parameters or {}) for t in types)
        self.rotaries = nn.ModuleDict({
            t: RotaryEmbedding(rope_spec(hf, head_dim, t if per_type else None), self.max_positions) for t in types
        })
        if device is not None:
            self.rotaries = self.rotaries.to(device)
        self.rotary = next(iter(self.rotaries.values()))  # for the profiler's table length

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(token_ids)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """One table per rotary kind (global and sliding layers may differ); each layer picks its own."""
        return {t: rotary.table(positions, dtype) for t, rotary in self.rotaries.items()}


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    pass
