"""Which of kernels/csrc/quant_ops.cpp's matmuls multiplies a quantized weight at which input row
count (engine/layers/packed_weight.py's PackedQuantizedWeight), on this CPU, and where PyTorch's own
packed ops (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) are the faster.

- AMX CPUs (amx_kernels()): int4 1-2 rows int4_mm_rows (AVX512-BF16 on the codes), 3-4 PyTorch's
  op, 5-1023 int4_mm_amx (tiles on blocks converted per call); int8 1-2 rows int8_mm_rows
  (AVX512-VNNI), 3-1023 int8_mm_amx (AMX-INT8); from 1024 rows the weight converted whole to
  bfloat16 per call for oneDNN (int4/int8_dequantize).
- CPUs with AVX512-BF16 (and VBMI) but no AMX (vector_kernels(): Zen 4/5, many cloud Xeons):
  the same loops where they do not need AMX, and vector loops in place of the tile loops:
  int4_mm_dpbf16 (the AMX loop's converted blocks times the rows by vdpbf16ps) and, with
  AVX512-VNNI, int8's: on AMD int8_mm_dpbf16 (its codes converted per block to bfloat16, then
  int4_mm_dpbf16's loop), elsewhere (Intel) int8_mm_dpbusd (int8_mm_rows's byte dot products,
  register-blocked over rows; ops.int8_split_bytes_preferred() says which, by the vendor rule in
  kernels/csrc/cpu_features.h), at every row count from
  their thresholds up (no whole-weight conversion: it measured slower). Thresholds below,
  measured (bench/bench_quant_matmul.py).
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

INT8_MAX_INPUTS = 65536  # int8's int32 sums hold K up to this (quant_ops.cpp's kInt8MaxK)
# Input rows from which the AMX kernels beat PyTorch's (measured at the default model's shapes,
# one thread: both even at 4 rows, AMX ahead from 6).
AMX_MIN_ROWS = 5
# int4: up to which its few-row loop, int4_mm_rows, beats PyTorch's op (one thread, the default
# model's shapes: 0.75-0.9x its time at one row, even at two, behind from three).
INT4_ROWS_MAX_ROWS = 2
# From which converting the whole weight to bfloat16 per call (int4/int8_dequantize, ~0.1 ns per
# weight) and oneDNN's bfloat16 matmul beat the AMX tile loop (int4, one thread, the default
# model's shapes: 0.6-0.8x its time at 2000 rows, even to 0.7x at 1024, behind at 512).
DENSE_MIN_ROWS = 1024
# int8: from which its AMX-INT8 kernel beats its few-row VNNI loop, int8_mm_rows (one thread, the
# default model's shapes: 0.8-1.0x its time at 3 rows, 0.9-1.15x at 2).
INT8_AMX_MIN_ROWS = 3

# Without AMX: measured on a 2-vCPU Sapphire Rapids VM with AMX hidden (one thread, thread CPU
# time, the default model's four projections, bench/bench_quant_matmul.py; times relative to
# oneDNN's packed bfloat16, the engine's bfloat16 path there).
# int4: int4_mm_rows (codes read per 4 rows, no conversion) up to here: 0.23-0.26x at 1 row
# (PyTorch's op 0.29-0.38x), 0.46-0.62x at 8 (int4_mm_dpbf16 0.61-0.73x), even with it at 12-16;
# from here on int4_mm_dpbf16: 0.82-0.88x at 24 (int4_mm_rows 0.89-1.03x), 0.88-1.01x at 64
# (PyTorch's op 1.06-1.13x), 0.98-1.03x at 1024.
VECTOR_INT4_ROWS_MAX_ROWS = 12
# Where AVX512-BF16's pair products are the fast way to multiply (AMD: cpu_features.h's vendor rule,
# the one int8_split_bytes_preferred() reports) int4_mm_rows holds on longer: on a Zen 4 (2 vCPUs,
# one thread, thread CPU time, the default model's four projections, 4 runs of
# bench_quant_matmul --only "int4 rows,int4 dpbf16" to 24 rows, 2 beyond, load 2.6-3.3) it took
# 0.54-0.76x bfloat16's time at 12 rows (int4_mm_dpbf16 0.63-0.93x), 0.67-0.82x at 16 (0.74-0.94x),
# 0.79-0.90x at 24 (0.79-0.96x; ahead or even in all 16 cells), 0.84-0.96x at 32 (0.86-0.99x; ahead
# in 7 of 8), behind from 48 (0.91-1.01x against 0.87-0.99x) and at 64. Both loops make the same
# vdpbf16ps products (4 per row per 64 bytes of codes, the bound from 3 rows on: a copy of
# int4_mm_rows' loop with the unpacking left out ran as fast); int4_mm_rows re-unpacks each block
# per 4 rows, where int4_mm_dpbf16 converts and stores it once and reloads it per 6 rows. Two
# threads were too noisy to time here (wall time, load 3-5); there int4_mm_rows splits whole
# 64-column blocks below 4 rows and 32-column halves from 4 (as int4_mm_dpbf16: the 9-block
# projections 4.5/4.5 rather than 5/4).
VECTOR_INT4_ROWS_PAIRS_FAST_MAX_ROWS = 32
# int8: int8_mm_rows (2 rows per pass) and int8_mm_dpbusd (3, block column sums once) within noise
# of each other to 24 rows (0.3-0.6x), int8_mm_dpbusd ahead beyond (1024 rows: 0.63-0.68x vs
# 0.70-0.81x; PyTorch's op: 0.7-0.8x at 1 row, 1.1-1.4x at 64).
VECTOR_INT8_ROWS_MAX_ROWS = 2
# Where int8_mm_dpbf16 is the many-row loop (AMD Zen 4, 2 vCPUs, one thread, thread CPU time, the
# default model's four projections): int8_mm_rows up to here: 0.27-0.33x oneDNN's bfloat16 time at 1
# row (int8_mm_dpbf16 0.29-0.41x), even at 2 (0.32-0.35x / 0.30-0.40x); int8_mm_dpbf16 from here
# on: 0.39-0.50x at 3 rows (int8_mm_rows 0.47-0.54x, ahead in 7 of 8 cells; 2 runs of
# bench_quant_matmul --only "int8 rows,int8 dpbf16", load 2.6-3.3: int8_mm_rows' 3 rows are
# passes of 2 and 1, 5 and 3 VNNI byte products per 64 codes, which issue at about half
# vdpbf16ps' rate here), 0.43-0.64x at 4 (0.63-0.77x), 0.63-0.87x at 8 (int8_mm_rows
# 0.85-1.03x), 0.93-1.06x bf16_linear's time at 16, 1.01-1.03x at 64 (int8_mm_dpbusd 1.6-1.9x
# and 2.0-2.1x).
VECTOR_INT8_DPBF16_ROWS_MAX_ROWS = 2
# No whole-weight conversion for oneDNN (DENSE_MIN_ROWS on AMX) here: at 1024 rows that took
# 1.04-1.10x bfloat16's time (the plain weight multiplies slower than the packed one),
# int4_mm_dpbf16 0.98-1.03x, int8_mm_dpbusd 0.63-0.68x; at 2048 (two threads, noisy) 0.89-1.17x
# against int4_mm_dpbf16's 0.72-1.01x.


@functools.cache
def avx512_kernels():
    """torch.ops.bento_llm where our C++ kernels are built for AVX-512 (PyTorch runs its AVX-512
    kernels, so its int4 layout is the AVX-512 one: not under ATEN_CPU_CAPABILITY=avx2) and load,
    else None. Each kernel family then asks the CPU for the subsets it needs."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    try:
        import kernels.cpu_ops  # noqa: F401  (builds and registers the ops)
    except ImportError as e:
        logger.info("our AVX-512 kernels do not load: PyTorch's ops only (%s)", e)
        return None
    return torch.ops.bento_llm


@functools.cache
def int4_f32_kernels():
    """avx512_kernels() where int4_f32_linear and int8_f32_linear multiply int4 / int8 strips by
    float32 rows (any AVX-512 CPU: f32_linear's loop nest, kernels/csrc/f32_linear.cpp), else None."""
    ops = avx512_kernels()
    return ops if ops is not None and ops.f32_linear_supported() else None


def int4_f32_strips(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight (codes [N, K] 0..15, scale and zero [N, K / group]; value = (code - 8) scale +
    zero) in int4_f32_linear's layout: codes [ceil(N/16), K/2, 16] uint8 (k's code in the low nibble,
    k + 1's in the high), groups [ceil(N/16), K/group, 2, 16] (scale, offset = zero - 8 scale:
    value = code * scale + offset, which the kernel factors per group), float16 where every scale
    and offset is exactly one (a GGUF's Q4_0 and Q4_1 are: a sixth fewer bytes to read, the same
    products), else float32. Padding columns: code 8, scale 0, zero 0, exactly 0."""
    codes, scale, zero = _pad_to_strips(codes, scale, zero)
    pairs = codes.to(torch.uint8).view(-1, 16, codes.shape[1] // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 2, 1).contiguous()
    return packed, _int4_strip_groups(scale, zero)


def _pad_to_strips(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """An int4 weight's rows padded to a multiple of 16 (whole strips): code 8, scale 0, zero 0,
    exactly 0 outputs, never stored."""
    pad = -codes.shape[0] % 16
    if not pad:
        return codes, scale, zero
    codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
    return codes, torch.nn.functional.pad(scale, (0, 0, 0, pad)), torch.nn.functional.pad(zero, (0, 0, 0, pad))


def _int4_strip_groups(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Scale and zero [N, K/group] (N a multiple of 16) as int4 strips' groups: [N/16, K/group, 2,
    16] (scale, offset = zero - 8 scale), float16 where all are exactly float16, else float32."""
    scale = scale.float()
    groups = torch.stack([scale, zero.float() - 8 * scale], dim=-1)  # [N, K/group, 2]
    half = groups.half()
    if torch.equal(half.float(), groups):
        groups = half
    return groups.view(-1, 16, *groups.shape[1:]).permute(0, 2, 3, 1).contiguous()


@functools.cache
def w4a8_kernels():
    """avx512_kernels() where w4a8_linear multiplies int4 strips by float32 rows rounded to int8 per
    group (AVX-512 with AVX512-VNNI: Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4; kernels/csrc/
    w4a8_linear.cpp), else None."""
    ops = avx512_kernels()
    return ops if ops is not None and ops.w4a8_supported() else None


def w4a8_strips(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight (as int4_f32_strips takes it) in w4a8_linear's layout: codes [ceil(N/16),
    K/8, 16, 4] uint8, byte b of column j at step s holding k = 8s + b's code in its low nibble and
    k = 8s + 4 + b's in its high one (a mask and a shift make two VNNI operands); scales as
    int4_f32_strips'. Padding columns: code 8, scale 0, zero 0, exactly 0."""
    codes, scale, zero = _pad_to_strips(codes, scale, zero)
    steps = codes.to(torch.uint8).view(-1, 16, codes.shape[1] // 8, 2, 4)  # [strip, column, step, half, byte]
    packed = (steps[..., 0, :] | (steps[..., 1, :] << 4)).permute(0, 2, 1, 3).contiguous()
    return packed, _int4_strip_groups(scale, zero)


def int8_f32_strips(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [N, K] with a scale per row (value = code * scale) in int8_f32_linear's layout:
    codes [ceil(N/16), K, 16] int8 (padding columns 0), scales [N] float32."""
    pad = -codes.shape[0] % 16
    codes = torch.nn.functional.pad(codes, (0, 0, 0, pad)) if pad else codes
    return codes.view(-1, 16, codes.shape[1]).transpose(1, 2).contiguous(), scale.reshape(-1).float()


@functools.cache
def vector_kernels():
    """avx512_kernels() where quant_ops.cpp's vector loops can run (AVX512-BF16 and VBMI; int8's
    also AVX512-VNNI: ops.avx512_vnni_supported()) on PyTorch's AVX-512 int4 layout; else None."""
    ops = avx512_kernels()
    return ops if ops is not None and ops.avx512_bf16_supported() else None


@functools.cache
def vector_int8_loops():
    """(the last row count int8_mm_rows takes, the op for more rows) without AMX-INT8: the bfloat16
    loop where it is the faster (AMD), else the byte product one (Intel)."""
    ops = vector_kernels()
    if ops.int8_split_bytes_preferred():
        return VECTOR_INT8_ROWS_MAX_ROWS, ops.int8_mm_dpbusd
    return VECTOR_INT8_DPBF16_ROWS_MAX_ROWS, ops.int8_mm_dpbf16


@functools.cache
def w8a8_kernels():
    """torch.ops.bento_llm where a w8a8 matmul can run: w8a8_mm_amx on AMX-INT8, else w8a8_mm_vnni on
    AVX512-VNNI (bfloat16 rows where the CPU has AVX512-BF16, float32 rows on any: Cascade Lake and
    Ice Lake too, ops.w8a8_vnni_supported()); else None (also for AMX-BF16 without AMX-INT8, which
    no CPU has)."""
    ops = avx512_kernels()
    if ops is None:
        return None
    if ops.amx_bf16_supported():
        return ops if ops.amx_int8_supported() else None
    return ops if ops.w8a8_vnni_supported() else None


@functools.cache
def amx_kernels():
    """torch.ops.bento_llm with the AMX quantized matmuls, or None where they cannot run: no
    AMX-BF16, or not PyTorch's AVX-512 int4 layout, or the C++ kernels do not build."""
    ops = vector_kernels()
    return ops if ops is not None and ops.amx_bf16_supported() else None


def int4_matmul(x: torch.Tensor, qweight, scales, group_size: int, out_features: int, amx: bool) -> torch.Tensor | None:
    """x [rows, K] bfloat16 @ an int4 weight in PyTorch's CPU pack (N padded to 64) on our
    kernels (amx: AMX's, else the vector loops); None where PyTorch's op is the faster."""
    rows = x.shape[0]
    if amx:
        ops = amx_kernels()
        if rows >= DENSE_MIN_ROWS:  # a transient bfloat16 copy, freed on return
            return x @ ops.int4_dequantize(qweight, scales, group_size, out_features)
        if rows >= AMX_MIN_ROWS:
            return ops.int4_mm_amx(x, qweight, scales, group_size, out_features)
        return ops.int4_mm_rows(x, qweight, scales, group_size, out_features) if rows <= INT4_ROWS_MAX_ROWS else None
    return vector_int4_op(rows)(x, qweight, scales, group_size, out_features)


@functools.cache
def vector_int4_rows_max_rows() -> int:
    """The last row count int4_mm_rows takes without AMX (int4_mm_dpbf16 beyond): further where
    AVX512-BF16's pair products are fast (AMD), by the vendor rule int8's loops follow."""
    pairs_slow = vector_kernels().int8_split_bytes_preferred()
    return VECTOR_INT4_ROWS_MAX_ROWS if pairs_slow else VECTOR_INT4_ROWS_PAIRS_FAST_MAX_ROWS


def int4_kernels_beat_bfloat16() -> str | None:
    """Which of our int4 kernels run here and measured at least as fast as the bfloat16 projections
    from one to 16 concurrent sequences (what quantization="auto" asks of int4: gguf_weights.py):
    "AMX" (1.2-1.3x bfloat16's tokens/s at 16 sequences, 1.7-1.8x at one), "AVX512-BF16 on AMD"
    (the vector loops where pair products are fast, the vendor rule of cpu_features.h: on a Zen 4,
    bench/bench_quant.py's interleaved rounds, 1.06-1.15x at 16 and 1.85-2.11x at one, 0.96-0.99x
    at 64), else None (Intel without AMX: unmeasured against bfloat16 there; no kernels)."""
    if amx_kernels() is not None:
        return "AMX"
    vector = vector_kernels()
    if vector is not None and not vector.int8_split_bytes_preferred():
        return "AVX512-BF16 on AMD"
    return None


def vector_int4_op(rows: int):
    """The vector loop that multiplies `rows` input rows by an int4 weight (no AMX)."""
    ops = vector_kernels()
    return ops.int4_mm_rows if rows <= vector_int4_rows_max_rows() else ops.int4_mm_dpbf16


def int8_matmul(x: torch.Tensor, qweight, scales, in_features: int, out_features: int, amx: bool) -> torch.Tensor:
    """x [rows, K] bfloat16 @ int8 codes in AMX-INT8's [N/64][K/4][64][4] layout (amx: on AMX-INT8,
    else the vector loops): every row count runs in quant_ops.cpp."""
    rows = x.shape[0]
    if amx:
        ops = amx_kernels()
        if rows >= DENSE_MIN_ROWS:  # a transient bfloat16 copy, freed on return
            return x @ ops.int8_dequantize(qweight, scales, out_features)[:in_features]
        op = ops.int8_mm_amx if rows >= INT8_AMX_MIN_ROWS else ops.int8_mm_rows
    else:
        op = vector_int8_op(rows)
    return op(x, qweight, scales, out_features)


def vector_int8_op(rows: int):
    """The vector loop that multiplies `rows` input rows by int8 codes (no AMX-INT8)."""
    few_rows, many_rows_op = vector_int8_loops()
    return vector_kernels().int8_mm_rows if rows <= few_rows else many_rows_op


def quantized_kernel_call(weight, rows: int) -> tuple[str, list, list[int]] | None:
    """(op name, tensor arguments, int arguments after the input) of the one op that multiplies
    `rows` bfloat16 input rows by a PackedQuantizedWeight on the vector loops (float32 rows: by its
    int4 / int8 strips, or w8a8's), as its forward does; None where its forward is not that one call (AMX, PyTorch's packed ops). For
    kernels/csrc/step_ops.cpp's decoder_layer, which calls the op by name."""
    if weight.w4a8:
        return ("bento_llm::w4a8_linear", [weight.qweight, weight.scales], [weight.out_features]) \
            if weight.dtype == torch.float32 else None
    if weight.f32_strips:
        op = "bento_llm::int4_f32_linear" if weight.bits == 4 else "bento_llm::int8_f32_linear"
        return op, [weight.qweight, weight.scales], [weight.out_features]
    if not weight.vector:
        return None
    if weight.w8a8:
        return (w8a8_kernels().w8a8_mm_vnni._qualified_op_name, [weight.qweight, weight.scales],
                [weight.out_features, weight.rotation])
    if weight.bits == 8:
        return vector_int8_op(rows)._qualified_op_name, [weight.qweight, weight.scales], [weight.out_features]
    return (vector_int4_op(rows)._qualified_op_name, [weight.qweight, weight.scales],
            [weight.group_size, weight.out_features])
