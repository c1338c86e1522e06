"""The Triton backend's per-token ops: RMSNorm (with or without the residual add before it), SwiGLU's
silu-and-mul and the rotary embedding, one kernel each.

Why: reference.py's torch versions launch 2-6 kernels a call (a float32 copy, the norm, the copy back;
mul, roll, addcmul, copy), ~6 calls a layer. A GPU decode step was ~600 launches for a 22-layer
model (bench/step_ops.py, an H200, 2026-12-04), most of them these. Each launch costs the host
~10-20 us in an eager step, and each kernel a few microseconds of the card in a CUDA graph, far more
than a batch's few rows of arithmetic.

Same names, arguments and results as kernels/reference.py's functions, and the same rounding: where
reference rounds an intermediate to the input's dtype (silu's output before the multiply, x * cos
before the rotation's add, the residual sum before its norm), so does the kernel. So in float32 they
match reference up to float32 reduction order, and in 16-bit types up to that and the last rounding
(tests/test_triton_pointwise.py states the rule; under Triton's interpreter, which truncates to
bfloat16, two bfloat16 steps). Layouts the kernels do not take (a last dimension
that is not dense, rows wider than MAX_WIDTH) go to reference's functions.

Per-step integers (the row counts) are do_not_specialize, as in triton_attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference

MAX_WIDTH = 32768  # widest row a program holds (a norm's hidden size; rotary's head_dim)
_ROW_ELEMENTS = 4096  # elements a program takes: several short rows, or one long one


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, rows, n, eps,
    stride_x, stride_residual, stride_out,
    ADD_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < n
    mask = (row < rows)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:  # residual += x in its dtype, and the norm of that rounded sum
        at = residual_ptr + row[:, None] * stride_residual + col[None, :]
        total = (tl.load(at, mask=mask, other=0.0).to(tl.float32) + x).to(residual_ptr.dtype.element_ty)
        tl.store(at, total, mask=mask)
        x = total.to(tl.float32)
    mean_square = tl.sum(x * x, axis=1) / n
    scale = 1.0 / tl.sqrt(mean_square + eps)
    weight = tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    y = x * scale[:, None] * weight[None, :]
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows"])
def _silu_mul_kernel(
    gate_up_ptr, out_ptr, rows, inter, stride_in, stride_out,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (row < rows)[:, None] & (col < inter)[None, :]
    at = gate_up_ptr + row[:, None] * stride_in + col[None, :]
    gate = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(at + inter, mask=mask, other=0.0).to(tl.float32)
    # silu(gate) rounded to the dtype before the multiply, as F.silu(gate) * up; exp overflowing
    # to inf gives -0, not NaN.
    activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], (activated * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows"])
def _rotary_kernel(
    qk_ptr, cos_ptr, sin_ptr, rows, heads, stride_token, stride_head, stride_cos, stride_sin,
    HALF: tl.constexpr, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # A row is one (token, head), turned in place as its two halves: the element j < HALF and
    # j + HALF are read and written by the same thread, so no thread overwrites what another
    # (another warp of a wide row, or another program) has yet to read.
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    token, head = row // heads, row % heads
    j = tl.arange(0, BLOCK_HALF)
    mask = (row < rows)[:, None] & (j < HALF)[None, :]
    first = qk_ptr + token[:, None] * stride_token + head[:, None] * stride_head + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    at_cos = cos_ptr + token[:, None] * stride_cos + j[None, :]
    at_sin = sin_ptr + token[:, None] * stride_sin + j[None, :]
    cos1 = tl.load(at_cos, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(at_cos + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(at_sin, mask=mask, other=0.0).to(tl.float32)  # signed: -sin for the first half
    sin2 = tl.load(at_sin + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = qk_ptr.dtype.element_ty
    # addcmul(qk * cos, roll(qk, HALF), sin): the product rounded to the dtype, then one rounding of
    # the sum; the roll puts x2 beside the first half and x1 beside the second.
    y1 = (x1 * cos1).to(dtype).to(tl.float32) + x2 * sin1
    y2 = (x2 * cos2).to(dtype).to(tl.float32) + x1 * sin2
    tl.store(first, y1.to(dtype), mask=mask)
    tl.store(first + HALF, y2.to(dtype), mask=mask)


def _rows_per_program(width: int) -> int:
    return max(1, _ROW_ELEMENTS // triton.next_power_of_2(width))


def _warps(elements: int) -> int:
    return 4 if elements <= 4096 else 8 if elements <= 16384 else 16


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    source = x if residual is None else residual
    rows, n = source.shape
    out = torch.empty(rows, n, dtype=source.dtype, device=source.device)
    if rows == 0:
        return out
    block_n = triton.next_power_of_2(n)
    per_program = _rows_per_program(n)
    _rms_norm_kernel[(triton.cdiv(rows, per_program),)](
        x, source, weight, out, rows, n, eps,
        x.stride(0), source.stride(0), out.stride(0),
        ADD_RESIDUAL=residual is not None, ROWS=per_program, BLOCK_N=block_n, num_warps=_warps(per_program * block_n),
    )
    return out


def _dense_rows(*tensors: torch.Tensor) -> bool:
    return all(t.dim() == 2 and t.stride(1) == 1 for t in tensors)


def _norm_takes(weight: torch.Tensor, *rows: torch.Tensor) -> bool:
    """Whether the norm kernel takes these: rows of one shape, dense, no wider than MAX_WIDTH, and
    a dense weight of their width (otherwise reference computes it, or says what does not fit)."""
    shape = rows[0].shape
    return (_dense_rows(*rows) and all(r.shape == shape for r in rows) and weight.is_contiguous()
            and weight.shape == shape[1:] and shape[1] <= MAX_WIDTH)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """reference.rms_norm: float32 arithmetic, the result rounded once to x's dtype."""
    if not _norm_takes(weight, x):
        return reference.rms_norm(x, weight, eps)
    return _norm(x, None, weight, eps)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """reference.add_rms_norm: residual += x in place (rounded to its dtype), then its norm."""
    if not _norm_takes(weight, residual, x):
        return reference.add_rms_norm(residual, x, weight, eps)
    return _norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """reference.silu_mul: silu(gate) * up over [tokens, 2 * I] -> [tokens, I]."""
    if not (_dense_rows(gate_up) and gate_up.shape[1] % 2 == 0):
        return reference.silu_mul(gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    per_program = _rows_per_program(block)
    _silu_mul_kernel[(triton.cdiv(rows, per_program), triton.cdiv(inter, block))](
        gate_up, out, rows, inter, gate_up.stride(0), out.stride(0),
        ROWS=per_program, BLOCK=block, num_warps=_warps(per_program * block),
    )
    return out


def rotary_embedding_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """reference.rotary_embedding_, in place on qk [tokens, heads, head_dim] (rows may be strided);
    cos and sin [tokens, 1, head_dim] in qk's dtype, sin signed for the first half."""
    tokens, heads, head_dim = qk.shape
    table_shape = (tokens, 1, head_dim)
    if not (qk.stride(2) == 1 and head_dim % 2 == 0 and head_dim <= MAX_WIDTH
            and cos.shape == table_shape and sin.shape == table_shape and cos.dtype == sin.dtype == qk.dtype
            and cos.stride(-1) == 1 and sin.stride(-1) == 1):
        return reference.rotary_embedding_(qk, cos, sin)  # e.g. tables broadcast over tokens, or of another dtype
    rows = tokens * heads
    if rows == 0:
        return None
    block_half = triton.next_power_of_2(head_dim // 2)
    per_program = _rows_per_program(head_dim)
    _rotary_kernel[(triton.cdiv(rows, per_program),)](
        qk, cos, sin, rows, heads, qk.stride(0), qk.stride(1), cos.stride(0), sin.stride(0),
        HALF=head_dim // 2, ROWS=per_program, BLOCK_HALF=block_half, num_warps=_warps(per_program * 2 * block_half),
    )
    return None
