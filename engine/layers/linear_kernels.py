"""Which kernel multiplies a bfloat16 projection or the tied LM head at which row count, on this
CPU (engine/layers/linear.py's Linear keeps each weight in the one layout its kernel reads):

- column strips (amx_linear_pack's layout): AMX tiles (kernels/csrc/amx_linear.cpp) where the CPU
  has AMX-BF16, else AVX512-BF16 dot products (kernels/csrc/bf16_linear.cpp); in float32 (the exact
  mode) strips of FMAs (f32_strips_pack, kernels/csrc/f32_linear.cpp) on any AVX-512 CPU;
- a plain [N, K] weight at few rows (the tied LM head, the embedding table as it lies): oneDNN's
  brgemm on AMX, else AVX512-BF16 dot products (bf16_mm_rows), else ATen's GEMV/GEMM
  (kernels/csrc/gemv_ops.cpp); in float32 (the exact mode's head) the same loops on FMAs
  (f32_mm_rows) wherever those kernels run, AMX CPUs included;
- else oneDNN's packed layout (packed_rows bounds the row counts it compiles kernels for).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from engine.layers.quant_kernels import amx_kernels
from engine.layers.quant_kernels import avx512_kernels


# Rows up to which a plain bfloat16 weight (the tied LM head) multiplies on AMX (kernels/csrc/
# gemv_ops.cpp): SmolLM2's 49152 x 576 head, one thread, A/B on a loaded AMX Xeon, vs torch.mv/mm
# (up to 16 rows) or F.linear: 1 row 8.9 vs 9.2 ms, 4 rows 12.5 vs 14.1, 16 rows 13.2 vs 18.1,
# 64 rows 23.7 vs 27.8; at 128 rows F.linear is faster (45.9 vs 50.9). Without AMX, bf16_mm_rows
# (AVX512-BF16) vs torch.mv/mm vs F.linear, two threads, loaded 2-vCPU Xeon (bench_limits.py
# --lm-head): 1 row 2.6 / 18.8 / 12.1 ms, 4 rows 4.9 / 15.4 / 13.3, 16 rows 15.5 / 19.5 / 25.5,
# 64 rows 61 / 74 / 76; at 128 rows even with F.linear (169 / 178 / 168 in an earlier run).
AMX_FEW_ROWS = 64


def few_rows_bfloat16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a few rows against a plain bfloat16 weight, reading the weight once: on
    AMX through brgemm with the weight as the streaming operand; else where the CPU has
    AVX512-BF16 through bf16_mm_rows' dot products (both kernels/csrc/gemv_ops.cpp); elsewhere up
    to 16 rows with the weight as the left operand of ATen's GEMV/GEMM, where F.linear took
    1.3-1.5x as long (one thread: 1 row 7.6 -> 5.0 ms, 2-16 rows 9.3-10.8 -> 6.9-8.7 ms)."""
    amx = amx_kernels() if x.device.type == "cpu" else None
    if amx is not None and weight.is_contiguous() and weight.shape[1] % 2 == 0:
        return amx.bf16_mm_amx(x if x.stride(-1) == 1 else x.contiguous(), weight)
    ops = avx512_bf16_ops() if x.device.type == "cpu" and amx is None else None  # AMX CPUs: as before
    if ops is not None and weight.is_contiguous():
        return ops.bf16_mm_rows(x, weight)
    if x.shape[0] == 1:
        return torch.mv(weight, x[0]).unsqueeze(0)
    if x.shape[0] <= 16:
        return torch.mm(weight, x.T).T.contiguous()
    return F.linear(x, weight)


def few_rows_float32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a few rows against a plain float32 weight (the exact mode's tied LM head)
    through f32_mm_rows (kernels/csrc/gemv_ops.cpp: bf16_mm_rows' loops on FMAs) where the CPU has
    our AVX-512 kernels, else F.linear. The 49152 x 576 head, two threads, EPYC Zen 4, median of 25
    calls with the caches cycled: 1 row 7.5 against F.linear's 12.5 ms (a float32 sum over the
    weight 3.5), 4 rows 6.3 / 21.3, 16 rows 11.2 / 26.1, 64 rows 28.1 / 51.8."""
    ops = avx512_bf16_ops() if x.device.type == "cpu" else None
    if ops is not None and weight.is_contiguous():
        return ops.f32_mm_rows(x, weight)
    return F.linear(x, weight)


# Input rows up to which the AMX strips multiply in place; more rows (prefill chunks) unpack them
# into a temporary plain weight for F.linear, whose oneDNN blocking is faster there (the hand loop
# reaches ~0.7x oneDNN's FLOP/s at 2000 rows; blocking it further along K, the input copied into
# tiles first, or L1 prefetch of the next rows did not close that). Measured with the unpack
# vectorized (one thread, thread CPU time on a loaded 2-vCPU AMX Xeon, A/B in one process, min of
# 11 passes), the default model's four projections of a layer, AMX / (unpack + F.linear) /
# F.linear on a plain weight: 512 rows 11.6 / 15.3 / 12.9 ms, 768 rows 7.75 / 7.93 / 5.95 (and
# 15.1 / 16.3 / 14.1 in a noisier pass), 896 rows 18.4 / 18.7 / 16.5, 1024 rows 20.4 / 19.8 / 17.5,
# 2000 rows 21.8 / 17.8 / 15.2 (the unpack itself ~0.5 ms a layer, scalar it was ~2).
AMX_STRIPS_MAX_ROWS = 768


# The same strips without AMX (kernels/csrc/bf16_linear.cpp, AVX512-BF16) multiply in place at
# every row count: against oneDNN's packed bfloat16 matmul (which unpack + F.linear reaches at
# best) on the default model's projections, one thread, A/B in one process on this 2-vCPU
# Sapphire Rapids without AMX: 0.53-0.67x its time at 1 row, 0.48-0.64 at 8, 0.68-0.75 at 16,
# 0.78-0.88 at 64, 0.95-0.98 at 256, 0.90-0.99 at 2000 (both ~80 GFLOP/s there). A bound all the
# same: tests lower it to run the unpack path on these CPUs too.
BF16_STRIPS_MAX_ROWS = sys.maxsize


@functools.cache
def amx_linear_ops():
    """torch.ops.bento_llm with kernels/csrc/amx_linear.cpp where the CPU has AMX-BF16 tiles, else None."""
    ops = amx_kernels()
    return ops if ops is not None and ops.amx_linear_supported() else None


@functools.cache
def avx512_bf16_ops():
    """avx512_kernels() with the AVX512-BF16 kernels (bf16_linear on column strips, bf16_mm_rows and
    f32_mm_rows on a plain weight) where the CPU has AVX512-BF16, else None."""
    ops = avx512_kernels()
    return ops if ops is not None and ops.avx512_bf16_kernels_supported() else None


@functools.cache
def f32_strips_ops():
    """avx512_kernels() where f32_linear multiplies float32 strips: a CPU with AVX-512 F/BW/VL/DQ,
    AVX512-BF16 or not (Skylake-SP to Ice Lake servers, where dtype=auto is float32, included);
    else None."""
    ops = avx512_kernels()
    return ops if ops is not None and ops.f32_linear_supported() else None


@functools.cache
def strips_ops():
    """The ops that multiply column strips here: AMX's (amx_linear), else AVX512-BF16's, else None."""
    amx = amx_linear_ops()
    return amx if amx is not None else avx512_bf16_ops()


def pack_strips(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] as the column strips this CPU multiplies in place, or None where it has no
    such kernel for the weight's dtype and width: bfloat16 with K a multiple of 32 on AMX-BF16 or
    AVX512-BF16 (amx_linear_pack), float32 on any AVX-512 CPU (f32_strips_ops; f32_strips_pack)."""
    if weight.device.type != "cpu":
        return None
    if weight.dtype == torch.bfloat16 and weight.shape[1] % 32 == 0 and strips_ops() is not None:
        return strips_ops().amx_linear_pack(weight)
    if weight.dtype == torch.float32 and f32_strips_ops() is not None:
        return f32_strips_pack(weight)
    return None


def f32_strips_pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [ceil(N/16), K, 16]: strip s, line k holds w[16 s + j][k] for j < 16 (the
    last strip's columns past N are zeros), f32_linear's layout (kernels/csrc/f32_linear.cpp), one
    for every row count. Against oneDNN's packed float32 matmul (the default model's four
    projection shapes x 30 layers in model order, two threads, EPYC Zen 4, median of 3-7
    interleaved passes, bench/RESULTS.md 2026-12-03 15:31 UTC): 1 row 0.62-0.75x its time (19.8-23.5
    against 12.2-17.5 GB/s), 2 rows 0.56x, 4 rows 0.80x, 8 rows 0.88-1.01x, 16 rows 0.98-1.07x, 64
    rows 0.97-1.09x, 256 rows 0.98x, 2000 rows 1.01x (~192 GFLOP/s both)."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // 16) * 16, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(-1, 16, k).transpose(1, 2).contiguous()


def strips_linear(x: torch.Tensor, strips: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """x @ W.T + bias for W kept as column strips: in float32 in place (f32_linear); in bfloat16 in
    place up to AMX_STRIPS_MAX_ROWS rows on AMX (BF16_STRIPS_MAX_ROWS without), else through a
    plain copy of W made for this call (freed after it)."""
    if strips.dtype == torch.float32:
        return f32_strips_ops().f32_linear(x if x.stride(-1) == 1 else x.contiguous(), strips, bias, out_features)
    amx = amx_linear_ops()
    if x.dtype == torch.bfloat16 and x.shape[0] <= (BF16_STRIPS_MAX_ROWS if amx is None else AMX_STRIPS_MAX_ROWS):
        x = x if x.stride(-1) == 1 else x.contiguous()
        if amx is not None:
            return amx.amx_linear(x, strips, bias, out_features)
        return strips_ops().bf16_linear(x, strips, bias, out_features)
    return F.linear(x, strips_ops().amx_linear_unpack(strips, out_features), bias)


def strips_kernel_call(rows: int, strips: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """(op name, tensor arguments, int arguments after the input) of the one op strips_linear runs
    for `rows` rows: float32's f32_linear, bfloat16's bf16_linear without AMX, else None (AMX CPUs
    keep their Python path in bfloat16). For kernels/csrc/step_ops.cpp's decoder_layer, which calls
    the op by name."""
    if strips.dtype == torch.float32:
        return "bento_llm::f32_linear", [strips, bias], [out_features]
    if amx_linear_ops() is not None or rows > BF16_STRIPS_MAX_ROWS:
        return None
    return "bento_llm::bf16_linear", [strips, bias], [out_features]


def packed_rows(rows: int) -> int:
    """The row count a packed matmul runs at. oneDNN builds a kernel for each input row count and
    keeps it for the life of the process (measured on an AMX Xeon: ~0.3 MB of heap per count and
    weight shape, not bounded by ONEDNN_PRIMITIVE_CACHE_CAPACITY), so a server that met every
    token count up to max_num_batched_tokens grew by gigabytes (the soak's rising RSS). From 64
    rows up, counts round up to 8 steps per power of two (at most 12.5% more rows, where the
    matmul's cost is in its rows): about 100 counts per weight shape for 2048 tokens."""
    if rows <= 64:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def can_pack_for_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and (dtype != torch.bfloat16 or _onednn_packs_bfloat16())
    )


@functools.cache
def _onednn_packs_bfloat16() -> bool:
    """oneDNN packs bfloat16 weights only on CPUs with AVX512-BW or AVX-NE-CONVERT (an AVX2-only
    CPU raises "bf16 path needs the cpu support ..." at the reorder); there F.linear runs them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op: may go away; probe the reorder itself
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=torch.bfloat16), None)
            return True
        except RuntimeError:
            return False
