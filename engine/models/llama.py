"""Llama-family decoders: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v biases), and the parts other
families reuse (attention with fused q/k/v and rotary, the gated MLP, the pre-norm layer).

Tensor parallel: q/k/v and gate/up are column-parallel (each rank holds its heads and MLP
columns), o and down are row-parallel (partial sums all-reduced), the embedding and LM head are
split by vocabulary rows. Without a ParallelState the model is the single-process one.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import SiluAndMul, gated_activation
from engine.layers.attention import Attention
from engine.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from engine.layers.linear_kernels import amx_linear_ops
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RopeTable, RotaryEmbedding
from engine.layers.step_module import StepModule
from engine.models.base import CausalLM
from engine.models.config import ModelConfig
from engine.parallel_state import ParallelState, rank_and_size

__all__ = ["LlamaForCausalLM", "ModelConfig", "RotaryEmbedding"]


class LlamaAttention(StepModule):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__()
        rank, size = rank_and_size(parallel)
        c = config
        self.qkv_proj = ColumnParallelLinear.qkv(
            c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.attention_bias, parallel
        )
        self.num_heads = c.num_heads // size
        self.num_kv_heads = self.qkv_proj.blocks[1].rows // c.head_dim
        self.head_dim = c.head_dim
        self.q_size, self.kv_size = self.num_heads * c.head_dim, self.num_kv_heads * c.head_dim
        self.o_proj = RowParallelLinear(c.num_heads * c.head_dim, c.hidden_size, c.o_proj_bias, parallel)
        window = c.layer_windows[layer_idx] if c.layer_windows else None
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, c.head_dim, self.scale(config), window)

    def scale(self, config: ModelConfig) -> float:
        return config.head_dim**-0.5

    def qk_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the fused projection's q and k heads [tokens, heads, head_dim]."""
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        return qk[:, : self.num_heads], qk[:, self.num_heads :]

    use_rope = True
    norms_qk = False  # True where the family has per-head q_norm and k_norm (Qwen3, Gemma 3)

    def norm_qk_(self, qkv: torch.Tensor) -> None:
        """The query and key heads normalized before the rotation, in place in the fused projection."""
        q, k = self.qk_heads(qkv)
        q.copy_(self.q_norm(q))
        k.copy_(self.k_norm(k))

    def forward(self, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.norms_qk:
            self.norm_qk_(qkv)
        return self.o_proj(self.attn(qkv, rope if self.use_rope else None))


def silu_mlp_fused_rows(gate_up: Linear, down: Linear) -> int:
    """Rows up to which a SwiGLU MLP of these projections runs as one AMX op (amx_silu_mlp in
    kernels/csrc/amx_linear.cpp: one parallel region for gate/up, the activation and down, where
    the three calls took two): both weights in column strips on an AMX CPU, no biases, down not
    split over ranks. 0 where it cannot."""
    fusable = (gate_up.strips and down.strips and gate_up.bias is None and down.bias is None
               and getattr(down, "parallel", None) is None and amx_linear_ops() is not None)
    # Asked only then: strips mean the kernels are built; a float32 model must not build them here.
    return amx_linear_ops().amx_silu_mlp_max_rows() if fusable else 0


class GatedMLP(StepModule):
    # Rows up to which the MLP is one fused op (silu_mlp_fused_rows); None until the first forward,
    # which runs after the weights took their layout.
    fused_rows: int | None = None

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool, parallel: ParallelState | None):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear.split(hidden_size, [intermediate_size] * 2, bias, parallel)
        self.act = gated_activation(act)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_rows is None:
            self.fused_rows = silu_mlp_fused_rows(self.gate_up_proj, self.down_proj) if isinstance(self.act, SiluAndMul) else 0
        if x.shape[0] <= self.fused_rows:
            return amx_linear_ops().amx_silu_mlp(x if x.stride(-1) == 1 else x.contiguous(),
                                                 self.gate_up_proj.packed_weight, self.down_proj.packed_weight,
                                                 self.down_proj.out_features)
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, layer_idx, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.make_mlp(config, layer_idx, parallel)

    def make_mlp(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias, parallel)

    def forward(self, x, residual, rope) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: the embeddings are the residual stream
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope), residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    layer_class = LlamaDecoderLayer

    def make_layer(self, layer_idx: int) -> nn.Module:
        return self.layer_class(self.config, layer_idx, self.parallel)
