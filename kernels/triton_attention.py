"""Triton paged attention: one kernel for mixed prefill/decode batches, split-K for long contexts.

Shapes are those of kernels/reference.py. Design points:
- One program owns a tile of BLOCK_M rows, each row a (query token, query head) pair of ONE KV
  head: the GROUP query heads sharing a KV head are packed into the rows, so a decode step with
  GQA/MQA reads each K/V tile once for the whole group. GROUP need not be a power of two (SmolLM2:
  9 query / 3 KV heads), rows past the group are masked.
- Keys are gathered per token (table[n // block_size], n % block_size), so the key tile BLOCK_N is
  independent of the cache block size, and head_dim 80/96 runs in a 128 tile with masked lanes.
- Mixed batches need no host-side max query length: each sequence gets `cu[i] // BLOCK_Q + i`
  as its first tile index (enough tiles for any query length, spare tiles do nothing), and a
  program finds its sequence by binary search over cu_query_lens. The grid depends only on tensor
  shapes, so the wrapper never syncs with the device (no .item()/.tolist()).
- Split-K: when the grid would be too small to fill the GPU (few sequences, long contexts) the key
  range is cut into segments, each program writes a partial (max, sum, unnormalised acc) and a
  reduce kernel merges them. The segment count comes from block_tables.shape[1] (an upper bound on
  the context), again without reading context_lens on the host.
- Variants (kernels/reference.py): a sliding window starts each tile's key loop at its first
  row's window and masks per row; soft-capping applies cap * tanh(s / cap) to the scaled scores.
- 8-bit caches (int8, or float8_e4m3fn read as raw bytes): K/V tiles are loaded as codes, which
  the dots take as they are; each row's float16 scale (the 2 bytes after its codes) multiplies
  its score column (K) or probability column (V; for float16 queries, the V tile). Nothing is
  dequantized to memory.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter's bf16/fp16 arithmetic is not trustworthy, so under it every dot runs in fp32.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634

MIN_SEGMENT_SIZE = 256  # below this a segment's fixed cost outweighs the parallelism it buys
MAX_SEGMENTS = 128  # bounds the reduce tile and the partial buffers


@triton.jit
def load_kv_tile(ptr, off_rows, d, mask, QUANT: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """A K or V tile: [BLOCK_N, BLOCK_D] when ROWS_FIRST, else [BLOCK_D, BLOCK_N]; in the cache's
    dtype (QUANT 0), or an 8-bit cache's codes as float32 values, unscaled (QUANT 1: int8, 2: e4m3
    bytes). Every code is exact in bfloat16 (int8's 8 bits, e4m3's 4 significant bits), so the dot
    takes them unrounded and each row's scale applies to its score (K) or probability (V) column:
    BLOCK_N multiplies a tile where scaling the tile took BLOCK_N x BLOCK_D (float16 queries scale
    the V tile instead: probabilities times small scales would go subnormal there)."""
    if ROWS_FIRST:
        offs = off_rows[:, None] + d[None, :]
    else:
        offs = off_rows[None, :] + d[:, None]
    x = tl.load(ptr + offs, mask=mask, other=0)
    # One if/else, no early return: the compiler generates the code after a `return` inside a
    # constexpr branch too.
    if QUANT == 0:
        tile = x
    elif QUANT == 1:
        tile = x.to(tl.float32)
    else:
        # e4m3: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal.
        code = x.to(tl.uint8, bitcast=True).to(tl.int32)
        e = (code >> 3) & 15
        m = (code & 7).to(tl.float32)
        # (8 + m) * 2^(e - 10), the power of two built from its bits (exact; CUDA's exp2 is not).
        mag = tl.where(e == 0, m * 0.001953125, (m + 8.0) * ((e + 117) << 23).to(tl.float32, bitcast=True))
        tile = tl.where(code >= 128, -mag, mag)
    return tile


@triton.jit
def load_row_scales(ptr, off_rows, row_ok, HEAD_DIM: tl.constexpr):
    """The float16 scale after each 8-bit row's codes (2 bytes at HEAD_DIM), as float32 [BLOCK_N];
    0 for rows outside the context (their scores are masked, their probabilities 0)."""
    lo = tl.load(ptr + off_rows + HEAD_DIM, mask=row_ok, other=0).to(tl.uint8, bitcast=True).to(tl.uint16)
    hi = tl.load(ptr + off_rows + HEAD_DIM + 1, mask=row_ok, other=0).to(tl.uint8, bitcast=True).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _find_seq(cu_query_lens_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with cu[i] // BLOCK_Q + i <= tile_idx, i.e. the sequence owning the tile."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_query_lens_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Per-step integers (the batch, the split, the block tables' width) are not specialized: a value
# of 1 or a multiple of 16 would compile another kernel when such a batch first arrives, a stall
# of ~0.6 s on an H200 (tests/triton_compile.py --specializations checks every launch).
@triton.jit(do_not_specialize=["num_seqs", "num_segments", "segment_size", "stride_table"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, context_lens_ptr, cu_query_lens_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    scale_log2, window, cap_scale, cap_log2, num_seqs, num_heads, num_segments, segment_size,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_table,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr, DECODE_ONLY: tl.constexpr, DOT_FP32: tl.constexpr,
    SLIDING: tl.constexpr, SOFT_CAP: tl.constexpr, QUANT: tl.constexpr,
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    if DECODE_ONLY:  # one query token per sequence: tile == sequence, no search needed
        seq = tile_idx
        q_start = tile_idx
        q_len = 1
        q_tile = 0
    else:
        seq = _find_seq(cu_query_lens_ptr, tile_idx, num_seqs, BLOCK_Q)
        q_start = tl.load(cu_query_lens_ptr + seq)
        q_len = tl.load(cu_query_lens_ptr + seq + 1) - q_start
        q_tile = tile_idx - (q_start // BLOCK_Q + seq)
    ctx_len = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    local = q_tile * BLOCK_Q + tok
    row_ok = (tok < BLOCK_Q) & (local < q_len)
    q_pos = ctx_len - q_len + local  # causal: row sees keys at positions <= q_pos
    token = (q_start + local).to(tl.int64)

    # Keys this tile can see at all; a spare tile (past its sequence's queries) sees none.
    tile_end = ctx_len - q_len + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    tile_end = tl.where(q_tile * BLOCK_Q < q_len, tile_end, 0)
    if SPLIT:
        kv_lo = segment * segment_size
        kv_hi = tl.minimum(kv_lo + segment_size, tile_end)
    else:
        kv_lo = 0
        kv_hi = tile_end
    if SLIDING:  # keys before the first row's window are seen by no row of the tile
        kv_lo = tl.maximum(kv_lo, ctx_len - q_len + q_tile * BLOCK_Q - window + 1)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    for start in range(kv_lo, kv_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_hi
        # int64 before scaling: a large cache overflows int32 element offsets.
        block = tl.load(table + n // CACHE_BLOCK, mask=n_ok, other=0).to(tl.int64)
        in_block = n % CACHE_BLOCK
        k_off = block * stride_kb + in_block * stride_kt + kv_head * stride_kh
        v_off = block * stride_vb + in_block * stride_vt + kv_head * stride_vh
        k = load_kv_tile(k_cache_ptr, k_off, d * stride_kd, n_ok[None, :] & d_ok[:, None],
                         QUANT, False)  # [BLOCK_D, BLOCK_N]
        v = load_kv_tile(v_cache_ptr, v_off, d * stride_vd, n_ok[:, None] & d_ok[None, :],
                         QUANT, True)  # [BLOCK_N, BLOCK_D]
        if DOT_FP32:
            # ieee: tf32 would cost fp32 inputs their precision for no gain in a memory-bound op.
            s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k.to(q.dtype))
        if QUANT != 0:
            s = s * load_row_scales(k_cache_ptr, k_off, n_ok, HEAD_DIM)[None, :]
        if SOFT_CAP:  # cap * tanh(s * scale / cap), tanh(x) = 1 - 2 / (e^2x + 1), in log2 units
            s = cap_log2 * (1.0 - 2.0 / (tl.exp(2.0 * cap_scale * s) + 1.0))
        else:
            s = s * scale_log2
        visible = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may have seen nothing yet (causal or segment bounds): keep -inf - -inf from NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT != 0:
            v_scale = load_row_scales(v_cache_ptr, v_off, n_ok, HEAD_DIM)
            if q.dtype == tl.float16:  # p * scale can fall below float16's normal range: scale the codes
                v = v * v_scale[:, None]
            else:  # bfloat16 has float32's exponent range
                p = p * v_scale[None, :]
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        part = (token * num_heads + head) * num_segments + segment
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        # An empty context (padded batch rows) yields zeros, not NaN.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_segments"])
def _reduce_segments_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    num_heads, num_segments, stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_segments
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (token * num_heads + head) * num_segments + s
    m = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty segments weigh 0
    denom = tl.sum(w * l, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Programs needed to keep the device busy: two per SM on CUDA; a few on the interpreter so the
    split path is exercised by the public functions too."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _pick_segments(programs: int, ctx_bound: int, device: torch.device) -> int:
    target = _target_programs(device)
    if programs >= target or ctx_bound <= MIN_SEGMENT_SIZE:
        return 1
    return max(1, min(triton.cdiv(target, programs), ctx_bound // MIN_SEGMENT_SIZE, MAX_SEGMENTS))


def attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_query_lens: torch.Tensor | None,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    *,
    out: torch.Tensor | None = None,
    num_segments: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Shared launcher. cu_query_lens=None means one query token per sequence (decode).
    out/num_segments/block_n exist for tests (poisoned outputs, forced split-K, small tiles)."""
    num_tokens, num_heads, head_dim = query.shape
    _, cache_block, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    decode_only = cu_query_lens is None
    num_seqs = num_tokens if decode_only else cu_query_lens.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out

    if decode_only:
        block_m, block_q, tiles = max(16, triton.next_power_of_2(group)), 1, num_tokens
    else:
        # Shape-only guess at the query length: long prefills want taller tiles for K/V reuse.
        rows_per_seq = group * num_tokens / num_seqs
        block_m = max(16 if rows_per_seq <= 16 else 64, triton.next_power_of_2(group))
        block_q = block_m // group
        tiles = num_tokens // block_q + num_seqs
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be positive, got {soft_cap}")
    quant = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(k_cache.dtype, 0)
    if block_n is None:
        # fp32 tiles (an fp32 cache, or 8-bit codes dequantized for an fp32 query): keep shared
        # memory in bounds.
        fp32_tiles = k_cache.element_size() == 4 or (quant and query.dtype == torch.float32)
        block_n = 32 if fp32_tiles else 64
    if quant == 2:  # read e4m3 as bytes and decode in the kernel (the interpreter has no fp8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)

    ctx_bound = block_tables.shape[1] * cache_block
    if num_segments is None:
        num_segments = _pick_segments(tiles * num_kv_heads, ctx_bound, query.device)
    segment_size = triton.cdiv(triton.cdiv(ctx_bound, max(num_segments, 1)), block_n) * block_n
    num_segments = max(1, triton.cdiv(ctx_bound, segment_size))
    split = num_segments > 1
    if split:
        part_m = torch.empty(num_tokens, num_heads, num_segments, device=query.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_tokens, num_heads, num_segments, head_dim, device=query.device, dtype=torch.float32)
    else:
        part_m = part_l = part_acc = out  # unused by the kernel when not splitting

    block_d = max(16, triton.next_power_of_2(head_dim))
    _paged_attention_kernel[(tiles, num_kv_heads, num_segments)](
        out, query, k_cache, v_cache,
        block_tables, context_lens, query if decode_only else cu_query_lens,
        part_m, part_l, part_acc,
        scale * _LOG2E, sliding_window or 0, scale / (soft_cap or 1.0), (soft_cap or 1.0) * _LOG2E,
        num_seqs, num_heads, num_segments, segment_size,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, CACHE_BLOCK=cache_block,
        SPLIT=split, DECODE_ONLY=decode_only,
        DOT_FP32=_INTERPRET or query.dtype == torch.float32,
        SLIDING=sliding_window is not None, SOFT_CAP=soft_cap is not None, QUANT=quant,
        num_warps=4 if block_m <= 64 else 8,
    )
    if split:
        _reduce_segments_kernel[(num_tokens, num_heads)](
            out, part_m, part_l, part_acc, num_heads, num_segments, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_segments)),
        )
    return out


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence (query is [num_seqs, num_heads, head_dim])."""
    return attention(query, k_cache, v_cache, block_tables, context_lens, None, scale, sliding_window, soft_cap)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_query_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention for a mixed batch of prefill chunks and decodes, in one launch."""
    return attention(query, k_cache, v_cache, block_tables, context_lens, cu_query_lens, scale, sliding_window,
                     soft_cap)

