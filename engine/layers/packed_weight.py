"""Quantized projections: a QuantizedWeight (engine/layers/quant.py) laid out for the matmul that
multiplies it, as buffers (PackedQuantizedWeight).

- int8 ([N][K] codes, a scale per row): `torch.ops.aten._weight_int8pack_mm` on CPU (float32 rows,
  which it multiplies at scalar speed: F.linear on the codes converted per call, then the scales).
- int4 (PyTorch's packed layout): `_weight_int4pack_mm_for_cpu` on CPU and `_weight_int4pack_mm`
  on CUDA (bfloat16 only).
- A float32 model's int4 and int8 weights on an AVX-512 CPU (f32_strips): strips of 16 output
  columns that kernels/csrc/f32_linear.cpp's int4_f32_linear / int8_f32_linear multiply (int4
  factored per group: x times the codes, then the group's scale and offset; int8's weight made as
  code * scale; float32 rounding of the dequantized product either way; int4's scales in float16
  where they are exactly float16, as a GGUF's; int4 2.8x / 1.5x / 1.1x float32's tokens/s at 1 /
  16 / 64 sequences). Elsewhere the float32 rows above.
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
- w4a8 (AVX512-VNNI, float32 rows): int4's codes (a GGUF's 4-bit blocks as they are) in strips of
  16 columns, times each input row rounded to int8 per weight group (max |x| / 127 of the group, no
  rotation): exact integer sums per group of code * rounded input and of the rounded inputs, then
  the group's scale and offset times the input's scale, i.e. the dequantized weight times the
  rounded inputs (kernels/csrc/w4a8_linear.cpp).
- CPUs with AVX512-BF16 but no AMX (Zen 4/5, cloud VMs that hide it) take quant_ops.cpp's vector
  loops instead of the tile loops, on the same layouts (int8: AMX-INT8's where there is
  AVX512-VNNI). Which kernel runs at which row count: engine/layers/quant_kernels.py.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from engine.layers.quant import QuantizedWeight
from engine.layers.quant_kernels import (INT8_MAX_INPUTS, avx512_kernels, int4_f32_kernels, int4_f32_strips, int4_matmul,
                                         int8_f32_strips, int8_matmul, vector_kernels, w4a8_kernels, w4a8_strips,
                                         w8a8_kernels)

logger = logging.getLogger(__name__)

# _convert_weight_to_int4pack_for_cpu wants the output rows in multiples of 16; its AVX-512
# layout, which our kernels read, tiles them by 64.
_INT4_ROW_MULTIPLE = 16
_AMX_ROW_MULTIPLE = 64  # our kernels' column block, for every format
_INT8_STEP_K = 64  # int8's AMX-INT8 step: inputs per tile row (quant_ops.cpp's kInt8StepK)


def _pad_rows(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    """int8 codes with zero rows up to a multiple of `multiple` (exactly 0 outputs, sliced off)."""
    pad = -codes.shape[0] % multiple
    return torch.cat([codes, codes.new_zeros(pad, codes.shape[1])]) if pad else codes



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
        self.w8a8 = int8_activations and q.bits == 8
        self.w4a8 = int8_activations and q.bits == 4
        if self.w4a8:
            self._init_w4a8(q, dtype, device)
            return
        # Weight-only int4/int8 in a float32 model on an AVX-512 CPU: in the strips of
        # int4_f32_linear / int8_f32_linear (kernels/csrc/f32_linear.cpp; its forward is that op).
        self.f32_strips = (not int8_activations and device.type == "cpu" and dtype == torch.float32
                           and int4_f32_kernels() is not None)
        if self.f32_strips:
            self.amx = self.vector = False
            codes, scales = int4_f32_strips(q.codes, q.scale, q.zero) if q.bits == 4 else int8_f32_strips(q.codes, q.scale)
            self.register_buffer("qweight", codes.to(device))
            self.register_buffer("scales", scales.to(device))
            return
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

    def _init_w4a8(self, q: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> None:
        """int4 codes in w4a8_linear's strips (kernels/csrc/w4a8_linear.cpp), scales and offsets as
        int4_f32_linear's (float16 where exactly float16, as a GGUF's)."""
        if device.type != "cpu" or w4a8_kernels() is None:
            raise ValueError("quantization='w4a8' needs a CPU with AVX-512 and AVX512-VNNI and the C++ kernels "
                             "(kernels/cpu_ops.py), which this machine lacks: use 'int4'")
        self.amx = self.vector = self.f32_strips = False
        self.dtype = dtype
        codes, scales = w4a8_strips(q.codes, q.scale, q.zero)
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)

    def int8_rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """int8 codes of the output rows `index` (all when None), [rows, in_features], whatever
        the layout: what a tied embedding gathers (w8a8's are codes of the rotated rows)."""
        if self.bits != 8:
            raise ValueError("only int8 rows are gathered")
        if self.f32_strips:  # [N/16, K, 16]: row n is column n % 16 of strip n // 16
            if index is None:
                return self.qweight.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]
            return self.qweight[index // 16, :, index % 16]
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
        if self.w4a8:  # float32 rows in, x's dtype out
            rows = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
            y = w4a8_kernels().w4a8_linear(rows, self.qweight, self.scales, self.out_features)
            return (y if x.dim() == 2 else y.reshape(*x.shape[:-1], -1)).to(x.dtype)
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
        if self.f32_strips:
            ops = int4_f32_kernels()
            rows = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
            matmul = ops.int4_f32_linear if self.bits == 4 else ops.int8_f32_linear
            y = matmul(rows, self.qweight, self.scales, self.out_features)
            return (y if x.dim() == 2 else y.reshape(*x.shape[:-1], -1)).to(x.dtype)
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
