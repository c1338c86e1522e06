"""The attention backend interface: the model hands it each layer's fused q/k/v projection (one
call: rotary, cache write and attention), it owns the paged cache.

A backend is a module of ops with one signature set (see kernels/reference.py): "torch" is the
plain-torch reference (any device), "cpu" the fused C++ kernels (kernels/cpu_ops.py), "triton"
the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1 for tests). The model also takes
its pointwise ops (norms, rotary, SwiGLU) from the backend's module.
"""

from __future__ import annotations

import importlib
import logging

import torch

from engine.forward_context import AttentionMetadata

logger = logging.getLogger(__name__)


_BACKEND_MODULES = {"cpu": "kernels.cpu_ops", "torch": "kernels.reference", "triton": "kernels.triton_ops"}


class AttentionBackend:
    def __init__(self, name: str, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]):
        """name "auto" picks by the caches' device: triton on CUDA, cpu on CPU unless its C++
        kernels cannot be built here (then torch, with a warning)."""
        if name != "auto" and name not in _BACKEND_MODULES:
            raise ValueError(f"attention_backend must be 'auto' or one of {sorted(_BACKEND_MODULES)}, got {name!r}")
        device = k_caches[0].device if k_caches else torch.device("cpu")
        if name == "cpu" and device.type != "cpu":
            raise ValueError(f"attention_backend='cpu' runs on CPU tensors only, the KV cache is on {device}")
        fallback = None
        if name == "auto":
            name = "triton" if device.type == "cuda" else "cpu"
            fallback = "torch" if name == "cpu" else None
        try:
            self.ops = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError as e:
            if fallback is None:
                raise ValueError(f"attention_backend={name!r} is unavailable here: {e}") from e
            logger.warning("using the plain-torch backend: %s", e)
            name, self.ops = fallback, importlib.import_module(_BACKEND_MODULES[fallback])
        self.name = name
        self.k_caches = k_caches
        self.v_caches = v_caches

    def forward(
        self,
        layer_idx: int,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        num_heads: int,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> torch.Tensor:
        """The layer's fused q/k/v projection [tokens, (num_heads + 2 kv_heads) * head_dim] ->
        attention output [tokens, num_heads * head_dim]: q and k rotated by rope's (cos, sin)
        (None: not rotated), k and v written to the layer's cache, q attending over it; one
        backend call (see kernels/reference.py's qkv_attention)."""
        cos, sin = rope if rope is not None else (None, None)
        return self.ops.qkv_attention(
            qkv, cos, sin, self.k_caches[layer_idx], self.v_caches[layer_idx], meta.slot_mapping, meta.block_tables,
            meta.context_lens, None if meta.all_decode else meta.cu_query_lens, num_heads, scale,
            sliding_window, soft_cap,
        )

    def copy_blocks(self, mapping: list[tuple[int, int]]) -> None:
        if mapping:
            device = self.k_caches[0].device
            self.ops.copy_blocks(self.k_caches, self.v_caches, torch.tensor(mapping, dtype=torch.int64, device=device))
