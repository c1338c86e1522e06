"""The Triton backend: the same functions, names and signatures as kernels/reference.py, so the
engine picks a backend by picking a module (`kernels.triton_ops` on CUDA, `kernels.cpu_ops` or
`kernels.reference` on CPU); the per-token ops (norms, silu-and-mul, rotary) are kernels of
triton_pointwise.py, the sampler's ops reference.py's torch ops. Import it only after
TRITON_INTERPRET is settled: Triton reads it at import time.

Host syncs: none of these functions reads a device value on the host (no .item()/.tolist());
launch grids come from tensor shapes only (see kernels/triton_attention.py for how).
"""

from __future__ import annotations

import sys

from kernels import reference
from kernels.reference import argmax_rows, filter_rows, sample_rows
from kernels.triton_attention import decode_attention, paged_attention
from kernels.triton_cache import copy_blocks, swap_blocks, write_kv_cache
from kernels.triton_moe import fused_moe
from kernels.triton_pointwise import add_rms_norm, rms_norm, rotary_embedding_, silu_mul

__all__ = [
    "write_kv_cache", "decode_attention", "paged_attention", "copy_blocks", "swap_blocks",
    "rms_norm", "add_rms_norm", "silu_mul", "rotary_embedding_", "fused_moe", "qkv_attention",
    "argmax_rows", "filter_rows", "sample_rows",
]

# Rotation, cache write and attention in one call, composed of this module's kernels.
qkv_attention = reference.composed_qkv_attention(sys.modules[__name__])
