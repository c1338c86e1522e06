"""Paged attention with a per-layer sliding window and attention-logit soft-capping, in plain
torch (any device): what Gemma 2/3 layers need. The C++ and Triton kernels do not have these
variants yet, so such layers run this whatever the backend (their KV writes still go through
the backend's op).

Same arguments as reference.paged_attention, plus:
  sliding_window  a query at position i sees keys j with i - window < j <= i (transformers' rule)
  soft_cap        scores become soft_cap * tanh(scores / soft_cap) after scaling, before masking
"""

from __future__ import annotations

import torch

from kernels.reference import _gather_context


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_query_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    out = torch.empty_like(query)
    group = query.shape[1] // k_cache.shape[2]
    cu, lens = cu_query_lens.tolist(), context_lens.tolist()
    for i, length in enumerate(lens):
        q = query[cu[i] : cu[i + 1]].float()
        n = q.shape[0]
        if n == 0:
            continue
        k = _gather_context(k_cache, block_tables[i], length).float().repeat_interleave(group, dim=1)
        v = _gather_context(v_cache, block_tables[i], length).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        q_pos = torch.arange(length - n, length, device=query.device)[:, None]
        k_pos = torch.arange(length, device=query.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~visible, float("-inf"))
        out[cu[i] : cu[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(query.dtype)
    return out
