"""Mixtral: Mistral's attention with a sparse MoE in place of the MLP (top-k of N experts per
token, routing weights renormalized over the chosen ones)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear
from engine.layers.moe import FusedMoE
from engine.models.config import ModelConfig
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel_state import ParallelState


class MixtralMoE(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState | None):
        super().__init__()
        hf = config.hf_config
        self.gate = Linear(config.hidden_size, hf.num_local_experts, bias=False)
        self.experts = FusedMoE(hf.num_local_experts, hf.num_experts_per_tok, config.hidden_size,
                                config.intermediate_size, True, config.hidden_act, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None) -> nn.Module:
        return MixtralMoE(config, parallel)


class MixtralForCausalLM(LlamaForCausalLM):
    layer_class = MixtralDecoderLayer

    def hf_to_param_name(self, hf_name: str) -> str | None:
        name = super().hf_to_param_name(hf_name)
        return None if name is None else name.replace(".block_sparse_moe.", ".mlp.")
