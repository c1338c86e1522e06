"""Paged attention for one layer: writes this step's k/v into the layer's cache and attends,
through the backend the forward context carries, with the layer's variants (sliding window,
logit soft-capping, softmax scale), which every backend implements."""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, soft_cap: float | None = None):
        """num_heads and num_kv_heads are this rank's."""
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window, self.soft_cap = sliding_window, soft_cap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim] -> [tokens, heads * head_dim]."""
        ctx = get_forward_context()
        out = ctx.backend.forward(self.layer_idx, q, k, v, ctx.meta, self.scale, self.sliding_window, self.soft_cap)
        return out.reshape(-1, self.num_heads * self.head_dim)
