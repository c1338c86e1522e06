"""The block Walsh-Hadamard rotation w8a8 multiplies in: y = (x R)(W R)^T = x W^T for an
orthogonal R, so rotating both sides changes nothing but what rounds to int8.

Small models' activations carry a few outlier channels; w8a8 rounds each input row with one
scale (max |x| / 127), so an outlier coarsens every other channel of its row. R spreads each
block of input columns over all of them (the idea of QuaRot and QuIP#: "incoherence"), and the
rows' int8 error drops about 3x on the default model (bench/bench_w8a8_rotation.py). R is
block-diagonal, one normalized Hadamard matrix of `block` columns per block, `block` the largest
power of two dividing the input width: 64 for SmolLM2's 576 = 9 x 64, 512 for its 1536 (mixing
all 576 columns measured only ~10% better than blocks of 64). The weight is rotated once, at load,
before its per-row int8 rounding; the input is rotated on every call inside the kernel, as it
quantizes each row (kernels/csrc/quant_ops.cpp, w8a8_mm_amx / w8a8_mm_vnni). The LM head's
table is rotated too: a tied embedding's lookup rotates its rows back (kernels/csrc/cpu_ops.cpp,
int8_quad_rows).
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

# Below 32 columns a block mixes too few channels to help much, and the kernel's in-register
# transform takes 16 at a time.
MIN_BLOCK = 32


@functools.cache
def hadamard_block(in_features: int) -> int:
    """The rotation's block for an input width: its largest power-of-two factor, or 0 (no
    rotation, logged once per width) where that is below MIN_BLOCK."""
    block = in_features & -in_features
    if block < MIN_BLOCK:
        logger.info("w8a8: input width %d has no power-of-two block of %d+ columns; its inputs are "
                    "quantized unrotated (coarser where a row has outlier channels)", in_features, MIN_BLOCK)
        return 0
    return block


def rotate(t: torch.Tensor, block: int) -> torch.Tensor:
    """t R in float32: each block of `block` columns times the normalized Hadamard matrix
    (a fast Walsh-Hadamard transform, log2(block) butterfly passes)."""
    rows, cols = t.reshape(-1, t.shape[-1]).shape
    out = t.float().reshape(rows, cols // block, 1, block)
    h = block
    while h > 1:  # pairs (i, i + h/2) within each span of h columns
        h //= 2
        pairs = out.reshape(rows, -1, 2, h)
        out = torch.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], dim=2)
    return (out.reshape(t.shape) * block**-0.5).to(torch.float32)
