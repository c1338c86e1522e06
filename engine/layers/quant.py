"""Quantized projections: the integer codes of a weight, and the layouts PyTorch's
own packed matmuls multiply with.

- int8: one scale per output row (symmetric), `torch.ops.aten._weight_int8pack_mm` on CPU
  (float32 rows, which it multiplies at scalar speed: F.linear on the codes, then the scales).
- int4: group-wise affine along the input dimension, value = (code - 8) * scale + zero with
  code 0..15 (PyTorch's "tinygemm" convention), `_weight_int4pack_mm_for_cpu` on CPU and
  `_weight_int4pack_mm` on CUDA (bfloat16 only).
- On AMX CPUs, bfloat16 inputs go to kernels/csrc/quant_ops.cpp instead (PyTorch's ops are vector
  loops, 3-20x slower than packed bfloat16 from 16 rows up). int4 keeps PyTorch's layout: 1-2
  rows run an AVX512-BF16 loop over the codes, 3-4 PyTorch's op, more our AMX tile loop on the
  codes converted block by block (about half of bfloat16's time at 16 rows, 0.7-1.0x at 64).
  int8 has AMX-INT8's layout ([N/64][K/4][64][4]; no AMX-INT8: PyTorch's op on [N][K]) and
  converts nothing: each input row is split into 16-bit fixed point (max |x| / 32767, error <=
  max |x| / 65534 per element) whose two byte planes multiply the codes (VNNI for 1-2 rows, AMX
  tiles from 3). From 1024 rows (a prefill chunk) either weight is converted whole to a transient
  bfloat16 [K, N] per call and multiplied by oneDNN (int8: code * scale rounded to bfloat16).
- w8a8 (CPUs with AMX-INT8, or AVX512-VNNI without AMX): int8 weights as int8 (one scale per output
  row), times the input quantized per row to int8 on every call (max |x| / 127), int32 sums
  scaled back: nothing is converted per weight, 0.3-0.6x bfloat16's time at 1-64 rows on AMX.
  Without AMX, AVX512-VNNI's byte products (w8a8_mm_vnni, the same sums and outputs) make twice
  AVX512-BF16's products per instruction; it takes a float32 model's rows as they are, so CPUs
  without AVX512-BF16 (Cascade Lake, Ice Lake) run it too, at four times float32's products per
  instruction. Both sides are rotated by the same block Hadamard matrix first
  (engine/layers/rotation.py: the weight at load, the input in the kernel), which cuts the
  activations' rounding error about 3x (README, "Weight quantization").
- CPUs with AVX512-BF16 but no AMX (Zen 4/5, cloud VMs that hide it) take quant_ops.cpp's vector
  loops instead of the tile loops, on the same layouts (int8: AMX-INT8's where there is
  AVX512-VNNI). Which kernel runs at which row count: engine/layers/quant_kernels.py.

A weight arrives as float (quantized here, at load) or already quantized (`QuantizedWeight`:
a GGUF Q4_0/Q4_1/Q4_K tensor maps onto int4 group 32 exactly, see engine/gguf_weights.py).
Rows and columns of a QuantizedWeight are sliced like a checkpoint tensor, so the parallel
linears' loaders take this rank's shard of it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import QUANTIZATION_GROUP_SIZES
from engine.layers.quant_kernels import (INT8_MAX_INPUTS, amx_kernels, avx512_kernels, int4_matmul, int8_matmul,
                                         vector_kernels, w8a8_kernels)
from engine.layers.rotation import hadamard_block, rotate

logger = logging.getLogger(__name__)

# _convert_weight_to_int4pack_for_cpu wants the output rows in multiples of 16; its AVX-512
# layout, which our kernels read, tiles them by 64.
_INT4_ROW_MULTIPLE = 16
_AMX_ROW_MULTIPLE = 64  # our kernels' column block, for every format
_INT8_STEP_K = 64  # int8's AMX-INT8 step: inputs per tile row (quant_ops.cpp's kInt8StepK)


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


def _pad_rows(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    """int8 codes with zero rows up to a multiple of `multiple` (exactly 0 outputs, sliced off)."""
    pad = -codes.shape[0] % multiple
    return torch.cat([codes, codes.new_zeros(pad, codes.shape[1])]) if pad else codes


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


def int4_group_size(cols: int, wanted: int) -> int | None:
    """The largest supported group size up to `wanted` that divides the input width (None: none does)."""
    return next((g for g in sorted(QUANTIZATION_GROUP_SIZES, reverse=True) if g <= wanted and cols % g == 0), None)


def quantize(weight: torch.Tensor | QuantizedWeight, method: str, group_size: int) -> QuantizedWeight | None:
    """A weight in `method`'s codes; None where it cannot be (the input width fits no group)."""
    if method == "w8a8" and not w8a8_fits(weight.shape[1]):
        return None
    if isinstance(weight, QuantizedWeight):
        if method == "int4" and weight.bits == 4:
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


@functools.cache  # once per process, not per layer
def _warn_int4_on_float32_rows() -> None:
    logger.warning("quantization='int4' with dtype=float32 on CPU runs PyTorch's int4 op on float32 rows, 35-60x "
                   "slower than on bfloat16 rows (a [3072, 576] weight on a Xeon without AVX512-BF16): "
                   "dtype='bfloat16' runs it (or our int4 kernels) on bfloat16 rows")


class PackedQuantizedWeight(torch.nn.Module):
    """One projection's weight in the layout its matmul reads, as buffers (so the model's
    memory report and .to() see them); no float copy is kept."""

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype, device: torch.device, int8_activations: bool = False):
        super().__init__()
        self.bits, self.group_size = q.bits, q.group_size
        self.out_features, self.in_features = q.shape
        self.w8a8 = int8_activations
        if int8_activations:
            self._init_w8a8(q, dtype, device)
            return
        # Our kernels run bfloat16 inputs on CPU (int4: input columns in pairs; int8: on AMX-INT8,
        # or without AMX on AVX512-VNNI): amx, or vector (quant_kernels.py's vector loops).
        ops = vector_kernels() if device.type == "cpu" and dtype == torch.bfloat16 else None
        fits = ops is not None and (self.in_features <= INT8_MAX_INPUTS if q.bits == 8 else self.in_features % 2 == 0)
        self.amx = fits and ops.amx_bf16_supported() and (q.bits == 4 or ops.amx_int8_supported())
        self.vector = fits and not ops.amx_bf16_supported() and (q.bits == 4 or ops.avx512_vnni_supported())
        if q.bits == 8:
            # Scales in the activation dtype: the ops require it. Our kernels: [N/64][K/4][64][4]
            # blocks, AMX-INT8's order (four inputs of a column side by side), K padded with zero
            # codes to the AMX kernel's 64-input step; else PyTorch's [N][K].
            codes = q.codes
            if self.amx or self.vector:
                codes = F.pad(_pad_rows(codes, _AMX_ROW_MULTIPLE), (0, -self.in_features % _INT8_STEP_K))
                codes = codes.reshape(-1, _AMX_ROW_MULTIPLE, codes.shape[1] // 4, 4).transpose(1, 2).contiguous()
            self.register_buffer("qweight", codes.to(device))
            self.register_buffer("scales", q.scale.reshape(-1).to(device, dtype))
            return
        if device.type == "cpu" and dtype == torch.float32:
            _warn_int4_on_float32_rows()
        multiple = _AMX_ROW_MULTIPLE if self.amx or self.vector else _INT4_ROW_MULTIPLE
        rows = -(-self.out_features // multiple) * multiple
        codes, scale, zero = q.codes, q.scale, q.zero
        if rows != self.out_features:  # padding rows: code 8, scale 0, zero 0 -> exactly 0, sliced off
            pad = rows - self.out_features
            codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
            scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
        # [groups, rows, 2]: scale and zero side by side, as the int4 matmuls read them.
        self.register_buffer("scales", torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(device, dtype))
        if device.type == "cuda":
            # The CUDA op takes two codes per byte (high nibble first) and tiles them itself.
            # It wants the input width in tiles of inner_k_tiles * 16 (not run here: no GPU in CI).
            inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (t * 16) == 0)
            pairs = codes.to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack((pairs[:, ::2] << 4) | pairs[:, 1::2], inner_k_tiles)
            self.register_buffer("qweight", packed)
        else:
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))

    def _init_w8a8(self, q: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> None:
        """int8 codes in the layout AMX-INT8 reads them ([N/64][K/4][64][4]: four input columns
        of 64 outputs side by side; AVX512-VNNI's byte products read the same), zero rows padding
        N to 64; float32 scales."""
        ops = w8a8_kernels() if device.type == "cpu" else None
        if ops is None:
            raise ValueError("quantization='w8a8' needs a CPU with AMX-INT8 or AVX512-VNNI and the C++ kernels "
                             "(kernels/cpu_ops.py); this machine has neither: use 'int8' or 'int4'")
        self.amx = ops.amx_bf16_supported()
        # The rows the kernel takes: AMX's bfloat16; w8a8_mm_vnni's float32 (any VNNI CPU) or
        # bfloat16 (with AVX512-BF16). vector: the model's own rows, so the forward is that one op,
        # which kernels/csrc/step_ops.cpp's decoder_layer can call; other rows are cast.
        takes_bfloat16 = self.amx or (dtype == torch.bfloat16 and ops.avx512_vnni_supported())
        self.rows_dtype = torch.bfloat16 if takes_bfloat16 else torch.float32
        self.vector = not self.amx and self.rows_dtype == dtype
        if self.in_features > INT8_MAX_INPUTS:  # the kernels' int32 sums would wrap
            raise ValueError(f"quantization='w8a8' takes projections of at most {INT8_MAX_INPUTS} inputs, this one has "
                             f"{self.in_features}: use 'int8' or 'int4'")
        self.rotation = q.rotation  # the kernel rotates each input row by the same blocks
        self.dtype = dtype  # a tied embedding's lookup returns rows in it
        codes = _pad_rows(q.codes, _AMX_ROW_MULTIPLE)
        tiles = codes.reshape(-1, 64, self.in_features // 4, 4).permute(0, 2, 1, 3).contiguous()
        self.register_buffer("qweight", tiles)
        self.register_buffer("scales", F.pad(q.scale.reshape(-1).float(), (0, codes.shape[0] - self.out_features)))

    def int8_rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """int8 codes of the output rows `index` (all when None), [rows, in_features], whatever
        the layout: what a tied embedding gathers (w8a8's are codes of the rotated rows)."""
        if self.bits != 8:
            raise ValueError("only int8 rows are gathered")
        if not (self.amx or self.vector or self.w8a8):
            return self.qweight if index is None else self.qweight[index]
        if index is None:
            index = torch.arange(self.out_features, device=self.qweight.device)
        # Each input quad [..][4] as one int32: the gather moves a quarter of the elements (pairs
        # as int16 measured 6x faster than bytes for a 64-token decode step's embedding lookup).
        quads = self.qweight.view(torch.int32)  # [N/64][K/4][64][1]
        codes = quads[index // _AMX_ROW_MULTIPLE, :, index % _AMX_ROW_MULTIPLE].view(torch.int8).flatten(-2)
        return codes[..., : self.in_features]

    def embedding_rows(self, index: torch.Tensor) -> torch.Tensor:
        """code * scale of the output rows `index`, in the model's dtype: a tied embedding's
        lookup. Our kernels' layout gathers in one op (cpu_ops.cpp's int8_quad_rows: the same bits
        as the torch ops, ten of them, ~25 us a batch-1 step). w8a8's rows are of W R: rotated
        back (R is its own inverse), so the lookup is W's row up to int8 rounding."""
        if (self.amx or self.vector or self.w8a8) and self.bits == 8:
            # (a reshape that changes nothing is still an op); w8a8: float32 rows (its scales'),
            # rotated back in the op
            flat = index if index.dim() == 1 else index.reshape(-1)
            rows = avx512_kernels().int8_quad_rows(self.qweight, self.scales, flat, self.in_features,
                                                   self.rotation if self.w8a8 else 0)
            rows = rows.to(self.dtype) if self.w8a8 else rows
            return rows if index.dim() == 1 else rows.view(*index.shape, self.in_features)
        return self.int8_rows(index).to(self.scales.dtype) * self.scales[index, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w8a8:  # activations are rounded to 8 bits anyway: rows_dtype in, x's dtype out
            ops = w8a8_kernels()
            matmul = ops.w8a8_mm_amx if self.amx else ops.w8a8_mm_vnni
            y = matmul(x.to(self.rows_dtype).contiguous(), self.qweight, self.scales, self.out_features, self.rotation)
            return y.to(x.dtype)
        if self.bits == 8 and (self.amx or self.vector):  # its own layout: every row count runs in quant_ops.cpp
            # A decode step's LM head: 2-D bfloat16 rows as they come, without the reshape and casts
            # that would return them unchanged (each still a torch call from Python).
            rows = x if x.dim() == 2 and x.dtype == torch.bfloat16 else x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = int8_matmul(rows.contiguous(), self.qweight, self.scales, self.in_features, self.out_features, self.amx)
            if x.dim() != 2:
                y = y.reshape(*x.shape[:-1], -1)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        x = x.contiguous()
        if (self.amx or self.vector) and x.dtype == torch.bfloat16 and x.dim() == 2:
            y = int4_matmul(x, self.qweight, self.scales, self.group_size, self.out_features, self.amx)
            if y is not None:
                return y
        if self.bits == 8:
            # No int8 packed op on CUDA; PyTorch's CPU op on float32 rows is a scalar-speed loop
            # (3.2x this one's time at 1 row, 77x at 2,000, a [3072, 576] weight, bench in RESULTS):
            # the codes converted per call, each output's scale after the sum (exact in float32).
            if x.device.type == "cuda" or x.dtype == torch.float32:
                return F.linear(x, self.qweight.to(x.dtype)) * self.scales
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x, self.qweight, self.group_size, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]
