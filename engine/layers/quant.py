"""Quantized weights: the integer codes of a weight (QuantizedWeight) and the quantizers that
make them at load. engine/layers/packed_weight.py lays them out for the matmuls that multiply them.

- int8: one scale per output row (symmetric): value = code * scale, code -128..127.
- int4: group-wise affine along the input dimension, value = (code - 8) * scale + zero with
  code 0..15 (PyTorch's "tinygemm" convention).
- w8a8: int8 per row of the weight times the block Hadamard matrix R (engine/layers/rotation.py),
  whose input is rotated by the same R and rounded to int8 per row in the kernel.
- w4a8: int4's codes, whose input is rounded to int8 per row and group in the kernel.

A weight arrives as float (quantized here, at load) or already quantized (`QuantizedWeight`:
a GGUF Q4_0/Q4_1/Q4_K tensor maps onto int4 group 32 exactly, see engine/gguf_weights.py).
Rows and columns of a QuantizedWeight are sliced like a checkpoint tensor, so the parallel
linears' loaders take this rank's shard of it unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.config import INT4_QUANTIZATIONS, INT8_ACTIVATION_QUANTIZATIONS, QUANTIZATION_GROUP_SIZES
from engine.layers.rotation import hadamard_block, rotate


@dataclass
class QuantizedWeight:
    """Integer codes [rows, cols] with a float32 scale (and, for int4, zero) per group of
    group_size columns. bits 4: value = (code - 8) * scale + zero, code 0..15 (uint8);
    bits 8: value = code * scale, code -128..127 (int8). rotation (w8a8 only): the codes are of
    W R, R the block Hadamard rotation of that many columns per block (engine/layers/rotation.py);
    0: of W itself."""

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor  # [rows, cols // group_size], float32
    zero: torch.Tensor | None  # int4 only
    group_size: int
    rotation: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def get_shape(self) -> list[int]:  # what parallel_state.weight_shape asks a lazy slice
        return list(self.codes.shape)

    def __getitem__(self, index) -> "QuantizedWeight":
        """[a:b] (rows) or [:, a:b] (columns, on group boundaries): what read_part takes."""
        if not isinstance(index, tuple):
            return self.rows(index.start or 0, (index.stop or self.shape[0]) - (index.start or 0))
        start, stop = index[1].start or 0, index[1].stop or self.shape[1]
        if self.rotation:
            raise ValueError("the columns of a rotated weight mix: it cannot be split by columns")
        if start % self.group_size or stop % self.group_size:
            raise ValueError(f"columns {start}:{stop} split a quantization group of {self.group_size}")
        g = slice(start // self.group_size, stop // self.group_size)
        return QuantizedWeight(self.bits, self.codes[:, start:stop], self.scale[:, g],
                               None if self.zero is None else self.zero[:, g], self.group_size)

    def rows(self, start: int, n: int) -> "QuantizedWeight":
        zero = None if self.zero is None else self.zero[start : start + n]
        return QuantizedWeight(self.bits, self.codes[start : start + n], self.scale[start : start + n], zero, self.group_size,
                               self.rotation)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: the reference the packed matmuls are tested against (a rotated
        weight rotated back: R is its own inverse)."""
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)  # noqa: E731
        if self.bits == 8:
            w = self.codes.float() * expand(self.scale)
            return rotate(w, self.rotation) if self.rotation else w
        return (self.codes.float() - 8) * expand(self.scale) + expand(self.zero)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    first = parts[0]
    if any(p.bits != first.bits or p.group_size != first.group_size or p.rotation != first.rotation for p in parts):
        raise ValueError("the blocks of a fused projection are quantized differently")
    zero = None if first.zero is None else torch.cat([p.zero for p in parts])
    return QuantizedWeight(first.bits, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           zero, first.group_size, first.rotation)


def quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Asymmetric min/max per group (the group's extremes are exact codes 0 and 15)."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((w - low[..., None]) / safe[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return QuantizedWeight(4, codes.reshape(rows, cols), scale, low + 8 * scale, group_size)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric, one scale per row (what _weight_int8pack_mm multiplies with)."""
    w = weight.float()
    scale = w.abs().amax(1, keepdim=True) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (w / safe).round_().clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(8, codes, scale, None, w.shape[1])


def quantize_w8a8(weight: torch.Tensor) -> QuantizedWeight:
    """int8 per row of the weight rotated as w8a8 rotates its input (unrotated where the width
    fits no block)."""
    block = hadamard_block(weight.shape[1])
    if not block:
        return quantize_int8(weight)
    return dataclasses.replace(quantize_int8(rotate(weight, block)), rotation=block)


def w8a8_fits(in_features: int) -> bool:
    """Whether w8a8's kernels take this input width: AMX-INT8 and VNNI read input columns in fours."""
    return in_features % 4 == 0


def rounds_activations(method: str | None) -> bool:
    """Whether `method`'s kernels round each input row to int8 (w8a8, w4a8), not weight-only."""
    return method in INT8_ACTIVATION_QUANTIZATIONS


def int4_group_size(cols: int, wanted: int) -> int | None:
    """The largest supported group size up to `wanted` that divides the input width (None: none does)."""
    return next((g for g in sorted(QUANTIZATION_GROUP_SIZES, reverse=True) if g <= wanted and cols % g == 0), None)


def quantize(weight: torch.Tensor | QuantizedWeight, method: str, group_size: int) -> QuantizedWeight | None:
    """A weight in `method`'s codes; None where it cannot be (the input width fits no group)."""
    if method == "w8a8" and not w8a8_fits(weight.shape[1]):
        return None
    if isinstance(weight, QuantizedWeight):
        if method in INT4_QUANTIZATIONS and weight.bits == 4:
            return weight
        if weight.bits == 8 and weight.group_size == weight.shape[1]:  # per-row int8, rotated as w8a8 wants it
            wanted = hadamard_block(weight.shape[1]) if method == "w8a8" else 0
            if method in ("int8", "w8a8") and weight.rotation == wanted:
                return weight
        weight = weight.dequantize()  # a format change (Q8_0 -> int4, Q4 -> per-row int8): logged by the caller
    if method == "w8a8":
        return quantize_w8a8(weight)
    if method == "int8":
        return quantize_int8(weight)
    group = int4_group_size(weight.shape[1], group_size)
    return None if group is None else quantize_int4(weight, group)


def quantize_blocks(blocks: list, method: str, group_size: int) -> QuantizedWeight | None:
    """Blocks stacked by rows (a fused projection: gate and up) as one weight in `method`'s codes.
    Float blocks take an already quantized int4 block's group size (a GGUF's 32), so one matmul
    reads them all; None where a block fits no layout."""
    group = next((b.group_size for b in blocks if isinstance(b, QuantizedWeight) and b.bits == 4), group_size)
    pieces = []
    for block in blocks:
        piece = quantize(block, method, group)
        if piece is None:
            return None
        pieces.append(piece)
    return concat_rows(pieces)
