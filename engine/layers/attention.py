"""Paged attention for one layer: writes this step's k/v into the layer's cache and attends,
through the backend the forward context carries. A layer with logit soft-capping, or a sliding
window that some sequence of the step has outgrown, attends through
kernels/attention_variants.py (plain torch) on every backend, until the C++ and Triton kernels
have those variants; within the window, windowed attention is full attention."""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_context import get_forward_context
from kernels import attention_variants


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
        if self.soft_cap is None and (self.sliding_window is None or self._window_covers_every_context(ctx.meta)):
            out = ctx.backend.forward(self.layer_idx, q, k, v, ctx.meta, self.scale)
        else:
            backend, meta = ctx.backend, ctx.meta
            k_cache, v_cache = backend.k_caches[self.layer_idx], backend.v_caches[self.layer_idx]
            backend.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            out = attention_variants.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                     meta.cu_query_lens, self.scale, self.sliding_window, self.soft_cap)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _window_covers_every_context(self, meta) -> bool:
        """No sequence is longer than the window: windowed attention is full attention, and the
        backend's own kernels compute it."""
        return meta.max_context_len is not None and meta.max_context_len <= self.sliding_window
