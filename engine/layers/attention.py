"""Paged attention for one layer, from its fused q/k/v projection: rotates q and k, writes this
step's k/v into the layer's cache and attends, in one call to the backend the forward context
carries, with the layer's variants (sliding window, logit soft-capping, softmax scale), which
every backend implements."""

from __future__ import annotations

import torch

from engine.forward_context import get_forward_context
from engine.layers.rotary import RopeTable
from engine.layers.step_module import StepModule


class Attention(StepModule):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, soft_cap: float | None = None):
        """num_heads and num_kv_heads are this rank's."""
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window, self.soft_cap = sliding_window, soft_cap

    def forward(self, qkv: torch.Tensor, rope: RopeTable | None) -> torch.Tensor:
        """qkv: the fused projection [tokens, (heads + 2 kv_heads) * head_dim], rotated in place
        by rope (None: no rotary) -> [tokens, heads * head_dim]."""
        ctx = get_forward_context()
        if rope is not None and rope.cos.shape[-1] != self.head_dim:  # partial rotary: turned here
            rope.rotate_(qkv[:, : (self.num_heads + self.num_kv_heads) * self.head_dim].view(
                -1, self.num_heads + self.num_kv_heads, self.head_dim))
            rope = None
        return ctx.backend.forward(self.layer_idx, qkv, rope, self.num_heads, ctx.meta, self.scale,
                                   self.sliding_window, self.soft_cap)
