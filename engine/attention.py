"""The attention backend interface: the model hands it q/k/v per layer, it owns the paged cache.

A backend is a module of ops with one signature set (see kernels/reference.py): "torch" is the
plain-torch reference (CPU and any device), "triton" the Triton kernels (CUDA, or the CPU under
TRITON_INTERPRET=1 for tests).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    context_lens: torch.Tensor  # int32 [num_seqs]
    cu_query_lens: torch.Tensor  # int32 [num_seqs + 1]
    max_query_len: int
    all_decode: bool  # every sequence has exactly one query token


_BACKEND_MODULES = {"torch": "kernels.reference", "triton": "kernels.triton_ops"}


class AttentionBackend:
    def __init__(self, name: str, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]):
        if name not in _BACKEND_MODULES:
            raise ValueError(f"attention_backend must be one of {sorted(_BACKEND_MODULES)}, got {name!r}")
        try:
            self.ops = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError as e:
            raise ValueError(f"attention_backend={name!r} is unavailable here: {e}") from e
        self.name = name
        self.k_caches = k_caches
        self.v_caches = v_caches

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        self.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.all_decode:
            return self.ops.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
        return self.ops.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_query_lens, scale
        )

    def copy_blocks(self, mapping: list[tuple[int, int]]) -> None:
        if mapping:
            device = self.k_caches[0].device
            self.ops.copy_blocks(self.k_caches, self.v_caches, torch.tensor(mapping, dtype=torch.int64, device=device))
