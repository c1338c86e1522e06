"""Triton KV-cache kernels: writing new tokens into their slots, and block copies (copy-on-write
within a pool, swap between pools). Shapes are those of kernels/reference.py."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.reference import KV_SCALE_BYTES

# Block copies move raw bytes: reinterpreting as same-width integers keeps NaN payloads intact and
# makes any cache dtype (fp8 included) copyable without a per-dtype kernel.
_INT_OF_WIDTH = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}
_COPY_TILE = 1024
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CACHE_BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # slot -1 marks padding tokens (CUDA-graph batches, tokens whose KV is already cached).
    mask = (slot >= 0) & (h[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM)
    block = slot // CACHE_BLOCK
    offset = slot % CACHE_BLOCK
    k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kct + h[:, None] * stride_kch + d[None, :] * stride_kcd,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vct + h[:, None] * stride_vch + d[None, :] * stride_vcd,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    return tl.where(tie & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)


@triton.jit
def _quantize_store(x, dst_ptr, row_off, h, d, row_ok, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr):
    """Rows x [BLOCK_H, BLOCK_D] (float32) -> codes and a float16 scale per row at dst_ptr +
    row_off (bytes), as kernels/reference.quantize_rows: int8 (QUANT 1) or e4m3 bytes (QUANT 2)."""
    mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    if QUANT == 1:
        code_max = 127.0
    else:
        code_max = 448.0
    scale = tl.math.div_rn(tl.max(tl.abs(tl.where(mask, x, 0.0)), 1), tl.full(row_ok.shape, code_max, tl.float32))
    scale = scale.to(tl.float16)
    s32 = scale.to(tl.float32)
    # div_rn: correctly rounded, as torch's and the C++ 1 / scale (CUDA's default fp32 division
    # is approximate, which would move codes that sit on a half step).
    ones = tl.full(s32.shape, 1.0, tl.float32)
    inv = tl.where(s32 > 0.0, tl.math.div_rn(ones, tl.where(s32 > 0.0, s32, 1.0)), 0.0)
    v = tl.minimum(tl.maximum(x * inv[:, None], -code_max), code_max)
    if QUANT == 1:
        code = _round_half_even(v).to(tl.int32)
    else:
        # e4m3, round to nearest even: exponent e = floor(log2|v|) (at least -6, the subnormal
        # range), 3 mantissa bits; a mantissa that rounds up to 8 carries into the exponent.
        a = tl.abs(v)
        e = tl.maximum(tl.floor(tl.log2(tl.where(a > 0.0, a, 1.0))), -6.0)
        e = tl.where(a > 0.0, e, -6.0)
        # 2^-e built from its bits: exact, where CUDA's exp2 is an approximation.
        mant = _round_half_even((a * ((127 - e.to(tl.int32)) << 23).to(tl.float32, bitcast=True) - 1.0) * 8.0)
        code = ((e + 7.0) * 8.0 + mant).to(tl.int32)
        code = tl.where(v < 0.0, code + 128, code)
    code = tl.where(code < 0, code + 256, code).to(tl.uint8).to(tl.int8, bitcast=True)
    tl.store(dst_ptr + row_off[:, None] + d[None, :], code, mask=mask)
    bits = scale.to(tl.uint16, bitcast=True)
    tl.store(dst_ptr + row_off + HEAD_DIM, (bits & 255).to(tl.uint8).to(tl.int8, bitcast=True), mask=row_ok)
    tl.store(dst_ptr + row_off + HEAD_DIM + 1, (bits >> 8).to(tl.uint8).to(tl.int8, bitcast=True), mask=row_ok)


@triton.jit
def _write_kv_cache_quant_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads, row_width,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
):
    """8-bit caches as int8 bytes [slots, kv_heads, row_width]: codes, scale, then padding to
    row_width (untouched); one program per token."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    row_ok = (slot >= 0) & (h < num_kv_heads)
    mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask, other=0.0)
    v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask,
                other=0.0)
    row_off = (slot * num_kv_heads + h) * row_width
    _quantize_store(k.to(tl.float32), k_cache_ptr, row_off, h, d, row_ok, HEAD_DIM, QUANT)
    _quantize_store(v.to(tl.float32), v_cache_ptr, row_off, h, d, row_ok, HEAD_DIM, QUANT)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Strided key/value (e.g. views into a fused QKV projection) are read in place."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    quant = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(k_cache.dtype, 0)
    if quant:
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
                and k_cache.shape[-1] >= head_dim + KV_SCALE_BYTES):
            raise ValueError("an 8-bit cache must be dense [blocks, block_size, kv_heads, head_dim + 2 (+ padding)]")
        _write_kv_cache_quant_kernel[(num_tokens,)](
            key, value, k_cache.view(torch.int8), v_cache.view(torch.int8), slot_mapping.contiguous(),
            num_kv_heads, k_cache.shape[-1], *key.stride(), *value.stride(),
            HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_D=triton.next_power_of_2(head_dim), QUANT=quant,
        )
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping.contiguous(),
        num_kv_heads,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), CACHE_BLOCK=k_cache.shape[1],
    )


@triton.jit
def _copy_blocks_kernel(
    ptr_table, mapping_ptr, block_numel, stride_map, src_block_stride, dst_block_stride,
    DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (pool pair, mapping row, chunk): copy one chunk of one block. ptr_table holds
    (src base, dst base) address pairs, one per pool pair, so all layers go in one launch."""
    pair = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    src_base = tl.load(ptr_table + 2 * pair).to(tl.pointer_type(DTYPE))
    dst_base = tl.load(ptr_table + 2 * pair + 1).to(tl.pointer_type(DTYPE))
    src = tl.load(mapping_ptr + row * stride_map).to(tl.int64)
    dst = tl.load(mapping_ptr + row * stride_map + 1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    x = tl.load(src_base + src * src_block_stride + offs, mask=mask)
    tl.store(dst_base + dst * dst_block_stride + offs, x, mask=mask)


_PTR_TABLES: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _ptr_table(addresses: list[int], device: torch.device) -> torch.Tensor:
    """Device tensor of base addresses. The engine's caches never move, so after the first call
    this is a dict hit instead of a host-to-device copy per layer per step."""
    key = (device, tuple(addresses))
    table = _PTR_TABLES.get(key)
    if table is None:
        if len(_PTR_TABLES) > 64:  # caches were reallocated (tests, engine restart): drop stale ones
            _PTR_TABLES.clear()
        table = torch.tensor(addresses, dtype=torch.int64, device=device)
        _PTR_TABLES[key] = table
    return table


def _launch_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]], block_mapping: torch.Tensor) -> None:
    """Copy mapped blocks for every (src, dst) pool pair; all pools share dtype and block layout."""
    src0, dst0 = pairs[0]
    block_numel = src0[0].numel()
    mapping = block_mapping.to(src0.device, non_blocking=True)
    dtype = _INT_OF_WIDTH[src0.element_size()]
    table = _ptr_table([t.data_ptr() for pair in pairs for t in pair], src0.device)
    _copy_blocks_kernel[(len(pairs), mapping.shape[0], triton.cdiv(block_numel, _COPY_TILE))](
        table, mapping, block_numel, mapping.stride(0), src0.stride(0), dst0.stride(0),
        DTYPE=dtype, BLOCK=_COPY_TILE,
    )


def _kernel_ok(caches: list[torch.Tensor]) -> bool:
    """One launch needs one dtype and one block layout, each block one contiguous run, on memory
    the kernel can reach (CUDA; CPU only under the interpreter, which is how tests run)."""
    first = caches[0]
    if not (first.device.type == "cuda" or (_INTERPRET and first.device.type == "cpu")):
        return False
    return all(
        c.dtype == first.dtype and c.shape[1:] == first.shape[1:] and c.stride(0) == first.stride(0)
        and c[0].is_contiguous() and c.device == first.device
        for c in caches
    )


def copy_blocks(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Copy whole blocks within each layer's cache: block_mapping is int64 [N, 2] of (src, dst).
    Unlike the reference's gather-then-scatter, blocks copy in parallel: a block must not be both
    a source and a destination in one call (copy-on-write never does that: dst is fresh)."""
    if block_mapping.shape[0] == 0 or not k_caches:
        return
    caches = list(k_caches) + list(v_caches)
    if _kernel_ok(caches):
        _launch_copy([(c, c) for c in caches], block_mapping)
    else:  # odd layouts (e.g. per-layer dtypes): one launch per cache still copies all blocks at once
        for c in caches:
            if _kernel_ok([c]):
                _launch_copy([(c, c)], block_mapping)
            else:
                src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
                c[dst.to(c.device)] = c[src.to(c.device)]


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy blocks between two pools. Same device: one kernel launch. Across devices (GPU <-> CPU
    swap) a Triton kernel cannot address host memory (short of pinned, UVA-mapped pools), and the
    copy is a DMA job anyway: gather the blocks on the source side, move them in ONE transfer, and
    scatter them on the destination side."""
    if block_mapping.shape[0] == 0:
        return
    same_layout = src_cache.dtype == dst_cache.dtype and src_cache.shape[1:] == dst_cache.shape[1:]
    if src_cache.device == dst_cache.device and same_layout and _kernel_ok([src_cache, dst_cache]):
        _launch_copy([(src_cache, dst_cache)], block_mapping)
        return
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    moved = src_cache.index_select(0, src.to(src_cache.device)).to(dst_cache.device).to(dst_cache.dtype)
    if dst_cache.element_size() == 1:  # index_copy_ has no float8 kernel: move the bytes
        dst_cache, moved = dst_cache.view(torch.uint8), moved.view(torch.uint8)
    dst_cache.index_copy_(0, dst.to(dst_cache.device), moved)

