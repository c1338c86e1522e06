"""Qwen2-MoE: Qwen2's attention (q/k/v biases); a sparse MoE on every decoder_sparse_step-th
layer outside mlp_only_layers, beside an always-on shared expert scaled by a sigmoid gate."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear
from engine.layers.moe import FusedMoE
from engine.models.config import ModelConfig
from engine.models.llama import GatedMLP, LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel_state import ParallelState


class QwenSparseMoE(nn.Module):
    """Qwen2-MoE's block; Qwen3-MoE's is the same without the shared expert."""

    def __init__(self, config: ModelConfig, parallel: ParallelState | None):
        super().__init__()
        hf = config.hf_config
        self.gate = Linear(config.hidden_size, hf.num_experts, bias=False)
        self.experts = FusedMoE(hf.num_experts, hf.num_experts_per_tok, config.hidden_size, hf.moe_intermediate_size,
                                bool(getattr(hf, "norm_topk_prob", False)), config.hidden_act, parallel)
        shared = getattr(hf, "shared_expert_intermediate_size", 0)
        self.shared_expert = None
        if shared:
            self.shared_expert = GatedMLP(config.hidden_size, shared, config.hidden_act, False, parallel)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def is_sparse_layer(hf_config, layer_idx: int) -> bool:
    return (
        layer_idx not in (getattr(hf_config, "mlp_only_layers", None) or [])
        and hf_config.num_experts > 0
        and (layer_idx + 1) % getattr(hf_config, "decoder_sparse_step", 1) == 0
    )


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None) -> nn.Module:
        if is_sparse_layer(config.hf_config, layer_idx):
            return QwenSparseMoE(config, parallel)
        return super().make_mlp(config, layer_idx, parallel)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_class = Qwen2MoeDecoderLayer
