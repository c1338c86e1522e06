"""Plain-torch ops: the "torch" backend (any device) and the oracle for the Triton and C++ kernels.

Paged attention and the KV cache, then the model's pointwise ops (norms, rotary, SwiGLU), which
kernels/cpu_ops.py fuses on CPU.

Shapes shared by every op (the Triton kernels in this package take the same arguments):
  k_cache, v_cache   [num_blocks, block_size, num_kv_heads, head_dim]
  key, value         [num_tokens, num_kv_heads, head_dim]
  query, output      [num_tokens, num_heads, head_dim]
  slot_mapping       int64 [num_tokens]; slot = block_id * block_size + offset; -1 = skip
  block_tables       int32 [num_seqs, max_blocks_per_seq]; unused entries hold any valid
                     block id (0) and are masked by context_lens
  context_lens       int32 [num_seqs]; tokens in the cache for the sequence, this step's included
  cu_query_lens      int32 [num_seqs + 1]; query tokens of sequence i are
                     query[cu_query_lens[i]:cu_query_lens[i + 1]], the last tokens of its context

Attention variants (every backend takes them, same names):
  scale              the softmax scale (Gemma: query_pre_attn_scalar ** -0.5)
  sliding_window     a query at position i sees keys j with i - window < j <= i (transformers'
                     rule); None: every earlier key
  soft_cap           scores become soft_cap * tanh(scores / soft_cap) after scaling (Gemma 2)

8-bit KV cache (kv_cache_dtype int8 or fp8_e4m3): a cache of dtype int8 or float8_e4m3fn whose
rows are head_dim + 2 wide: head_dim codes, then the row's scale as the 2 bytes of a float16; on
CUDA the row is padded after the scale to a multiple of 16 bytes (kv_row_width says why).
One scale per (token, KV head), set when the token is written: scale = max|x| / 127 (int8,
codes rounded to nearest) or max|x| / 448 (e4m3, the format's largest finite value). A
per-row scale needs no calibration and cannot clip, costs 2 bytes per head_dim (3% at 64), and
lives inside the block, so every block copy (copy-on-write, swap, prefix reuse) moves the scales
with the codes. These functions dequantize rows as they stage them; the C++ decode kernel
converts codes in registers (kernels/csrc/kv_codes.h); none makes a float copy of the cache.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


KV_SCALE_BYTES = 2  # float16 scale after each row's codes
# Triton reads 16 bytes per load only where every row starts 16-byte aligned. Rows of head_dim + 2
# bytes (130 at head_dim 128) start 2-byte aligned at every other KV head, and the GPU kernels then
# read the codes a byte at a time: 3-37x the time of a bfloat16 cache on an H200 (bench/RESULTS.md,
# 2026-12-04). The C++ CPU kernels load unaligned rows at full speed, so only CUDA caches pad.
GPU_KV_ROW_ALIGN = 16
_CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype in _CODE_MAX


def kv_row_width(head_dim: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """Elements of one (token, KV head) row of a cache of dtype on device: head_dim, or for an
    8-bit cache its codes and scale, padded on CUDA to a multiple of GPU_KV_ROW_ALIGN bytes."""
    if dtype.itemsize != 1:
        return head_dim
    width = head_dim + KV_SCALE_BYTES
    if torch.device(device).type == "cuda":
        width = -(-width // GPU_KV_ROW_ALIGN) * GPU_KV_ROW_ALIGN
    return width


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """[..., head_dim] float -> [..., width] codes of dtype with their float16 scale, then zeros to
    width (default head_dim + 2: no padding)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / _CODE_MAX[dtype]).to(torch.float16)
    inv = torch.where(scale > 0, 1.0 / scale.float(), 0.0)  # an all-zero row: codes 0, scale 0
    if dtype == torch.int8:
        codes = (xf * inv).round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        codes = (xf * inv).clamp_(-448.0, 448.0).to(dtype).view(torch.uint8)
    pad = 0 if width is None else width - x.shape[-1] - KV_SCALE_BYTES
    if pad < 0:
        raise ValueError(f"width {width} cannot hold {x.shape[-1]} codes and their scale")
    out = torch.cat([codes, scale.view(torch.uint8), codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    return out.view(dtype)


def dequantize_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[..., width] codes, scale (and padding) -> [..., head_dim] float32."""
    raw = rows.view(torch.uint8)
    scale = raw[..., head_dim : head_dim + KV_SCALE_BYTES].contiguous().view(torch.float16).float()
    return raw[..., :head_dim].view(rows.dtype).float() * scale


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if is_quantized(k_cache):
        width = k_cache.shape[-1]
        key, value = quantize_rows(key, k_cache.dtype, width), quantize_rows(value, v_cache.dtype, width)
    num_blocks, block_size = k_cache.shape[:2]
    # index_copy_ has no float8 kernel: copy raw bytes (same width) for every dtype.
    for src, cache in ((key, k_cache), (value, v_cache)):
        rows = cache.view(num_blocks * block_size, *cache.shape[2:])
        if cache.element_size() == 1:
            rows.view(torch.uint8).index_copy_(0, slot_mapping, src.view(torch.uint8))
        else:
            rows.index_copy_(0, slot_mapping, src.to(cache.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's cached tokens, contiguous: [context_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]


@dataclass
class _DecodePlan:
    """Where each sequence's context sits in the cache, for a decode step."""

    block_tables: torch.Tensor
    context_lens: torch.Tensor
    versions: tuple[int, ...]
    block_size: int
    slots: torch.Tensor  # int64 [num_seqs * max_len]: cache row of each (sequence, position)
    padding: torch.Tensor  # indices into slots past their sequence's context
    bias: torch.Tensor  # float32 [num_seqs, 1, 1, max_len]: 0 inside the context, -inf past it
    empty: torch.Tensor | None  # bool [num_seqs]: sequences with no context at all; None if none
    max_len: int
    masks: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The bias in the query's dtype (SDPA wants them equal), converted once a step."""
        if dtype not in self.masks:
            self.masks[dtype] = self.bias.to(dtype)
        return self.masks[dtype]

    def fits(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> bool:
        return (
            self.block_tables is block_tables
            and self.context_lens is context_lens
            and self.versions == _versions(block_tables, context_lens)
            and self.block_size == block_size
        )


_last_decode_plan: _DecodePlan | None = None


def _versions(*tensors: torch.Tensor) -> tuple[int, ...]:
    # In-place writes bump a tensor's version; inference tensors (the engine's) have none, and
    # the engine builds fresh ones every step.
    return tuple(-1 if t.is_inference() else t._version for t in tensors)


def _decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> _DecodePlan:
    # Every layer of a step passes the same two tensors, so the plan is built once a step and
    # reused by the other layers (it holds the tensors, so their identity cannot be recycled).
    global _last_decode_plan
    plan = _last_decode_plan
    if plan is not None and plan.fits(block_tables, context_lens, block_size):
        return plan
    device = block_tables.device
    lens = context_lens.to(device)
    max_len = int(lens.max())
    positions = torch.arange(max_len, device=device)
    valid = positions[None, :] < lens[:, None]  # [num_seqs, max_len]
    slots = (block_tables.long()[:, positions // block_size] * block_size + positions % block_size).flatten()
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=device).masked_fill_(~valid, float("-inf"))
    empty = lens == 0
    plan = _DecodePlan(
        block_tables=block_tables, context_lens=context_lens,
        versions=_versions(block_tables, context_lens), block_size=block_size,
        slots=slots, padding=(~valid).flatten().nonzero().squeeze(1), bias=bias[:, None, None, :],
        empty=empty if bool(empty.any()) else None, max_len=max_len,
    )
    _last_decode_plan = plan
    return plan


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
    if sliding_window is not None or soft_cap is not None or is_quantized(k_cache):
        cu = torch.arange(query.shape[0] + 1, dtype=torch.int32, device=query.device)
        return _attention_in_float32(query, k_cache, v_cache, block_tables, context_lens, cu, scale,
                                     sliding_window, soft_cap)
    num_seqs, num_heads, head_dim = query.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    plan = _decode_plan(block_tables, context_lens, block_size)

    def gather(cache: torch.Tensor) -> torch.Tensor:
        # A row gather over the cache viewed as [slots, kv_heads * head_dim] moves whole
        # contiguous rows, several times faster on CPU than advanced indexing of the 4-d blocks.
        rows = cache.view(-1, kv_heads * head_dim).index_select(0, plan.slots).to(query.dtype)
        # Rows past a context hold whatever the cache memory held (stale tokens, or NaN bit
        # patterns in never-written memory), and a -inf score alone lets NaN through (0 * NaN).
        rows.index_fill_(0, plan.padding, 0)
        return rows.view(num_seqs, plan.max_len, kv_heads, head_dim).transpose(1, 2)

    # The query heads sharing a KV head attend as that head's rows of queries: one SDPA call
    # with no GQA expansion, measured ~2x faster on CPU than enable_gqa with one query row each.
    out = F.scaled_dot_product_attention(
        query.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim), gather(k_cache), gather(v_cache),
        attn_mask=plan.mask(query.dtype), scale=scale,
    ).reshape(num_seqs, num_heads, head_dim)
    # A sequence with no context (a padding row) attends to nothing: zeros, not NaN.
    return out if plan.empty is None else out.masked_fill(plan.empty[:, None, None], 0)


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
    """Causal attention for a mixed batch: prefill chunks (many query tokens, possibly after
    cached context) and decodes (one query token). Query token j of a sequence with q query
    tokens and c context tokens sits at position c - q + j and sees positions up to it.
    Decode rows run together through decode_attention; prefill rows SDPA one sequence at a time
    on a gathered copy of its context."""
    if sliding_window is not None or soft_cap is not None or is_quantized(k_cache):
        return _attention_in_float32(query, k_cache, v_cache, block_tables, context_lens, cu_query_lens, scale,
                                     sliding_window, soft_cap)
    num_tokens, num_heads, head_dim = query.shape
    output = torch.empty_like(query)
    query_lens = (cu_query_lens[1:] - cu_query_lens[:-1]).tolist()
    starts = cu_query_lens[:-1].tolist()
    ctx_lens = context_lens.tolist()
    decode_rows = [i for i, q in enumerate(query_lens) if q == 1]
    if len(decode_rows) > 1:
        rows = torch.tensor(decode_rows, device=query.device)
        token_idx = cu_query_lens[:-1].long()[rows]
        output[token_idx] = decode_attention(
            query[token_idx], k_cache, v_cache, block_tables[rows], context_lens[rows], scale
        )
        done = set(decode_rows)
    else:
        done = set()
    for i, (start, q_len, ctx_len) in enumerate(zip(starts, query_lens, ctx_lens)):
        if i in done or q_len == 0:
            continue
        q = query[start : start + q_len].transpose(0, 1)  # [heads, q_len, d]
        k = _gather_context(k_cache, block_tables[i], ctx_len).transpose(0, 1).to(query.dtype)
        v = _gather_context(v_cache, block_tables[i], ctx_len).transpose(0, 1).to(query.dtype)
        gqa = k.shape[0] != num_heads
        if q_len == ctx_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        elif q_len == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        else:
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
            mask = torch.arange(ctx_len, device=query.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        output[start : start + q_len] = out.transpose(0, 1)
    return output


def _attention_in_float32(query, k_cache, v_cache, block_tables, context_lens, cu_query_lens, scale,
                          sliding_window, soft_cap) -> torch.Tensor:
    """The variants (window, soft-cap, 8-bit cache), written out: one sequence at a time, scores
    in float32 over its gathered (and dequantized) context."""
    out = torch.empty_like(query)
    group = query.shape[1] // k_cache.shape[2]
    cu, lens = cu_query_lens.tolist(), context_lens.tolist()
    head_dim = query.shape[-1]
    load = (lambda rows: dequantize_rows(rows, head_dim)) if is_quantized(k_cache) else (lambda rows: rows.float())
    for i, length in enumerate(lens):
        q = query[cu[i] : cu[i + 1]].float()
        n = q.shape[0]
        if n == 0:
            continue
        if length == 0:  # a padding row attends to nothing: zeros
            out[cu[i] : cu[i + 1]] = 0
            continue
        k = load(_gather_context(k_cache, block_tables[i], length)).repeat_interleave(group, dim=1)
        v = load(_gather_context(v_cache, block_tables[i], length)).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        q_pos = torch.arange(length - n, length, device=query.device)[:, None]
        k_pos = torch.arange(length, device=query.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~visible, float("-inf"))
        out[cu[i] : cu[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(query.dtype)
    return out


def copy_blocks(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Copy whole blocks within each layer's cache: block_mapping is int64 [N, 2] of (src, dst)."""
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    for k_cache, v_cache in zip(k_caches, v_caches):
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy blocks between two pools that may live on different devices (GPU <-> CPU swap)."""
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    dst_cache[dst.to(dst_cache.device)] = src_cache[src.to(src_cache.device)].to(dst_cache.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 whatever x's dtype (weight is float32: LlamaForCausalLM.keep_norms_in_float32),
    rounded once to x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place, then the norm of the sum: a decoder sublayer's pre-norm."""
    return rms_norm(residual.add_(x), weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation over the fused projection's output [tokens, 2 * I]: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's index of its largest value [rows] (int64): the first of equal maxima, the first
    NaN if any, as torch.argmax (the sampler's greedy pick)."""
    return logits.max(dim=-1).indices  # the first maximum, as argmax, ~1.7x faster on CPU


def filter_rows(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None,
                top_p: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """Each row's logits / temperature [rows] where its filters keep them, -inf elsewhere (None: no
    row uses that parameter; top_k int64 and top_p come together). A row is ordered by value
    descending, equal values by index ascending: top_k keeps the first top_k of that order; top_p
    its shortest prefix whose mass, renormalized over the top-k set, reaches top_p (top_p >= 1: no
    filter); min_p then drops tokens below min_p times the largest probability."""
    if temperature is not None:
        logits = logits / temperature[:, None]
    if top_k is not None:
        logits = _top_k_top_p(logits, top_k, top_p)
    if min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample_rows(logits: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor, temperature: torch.Tensor | None,
                top_k: torch.Tensor | None, top_p: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """Each row's token [rows] (int64): a greedy row's (bool [rows]) argmax; another's draw from its
    filter_rows distribution at its uniform in [0, 1) by inverse transform: the first token whose
    cumulative probability, in vocabulary order, passes uniform times the row's total.

    One random number per row (the exponential race it replaced drew one per vocabulary entry: 157
    ms for 64 rows of 49152 on 2 vCPUs). ATen's CPU cumsum accumulates float32 in double and rounds
    each entry once, so each token is drawn with its probability to within 2^-24 of the row's mass
    (the uniform's resolution too)."""
    filtered = filter_rows(logits, temperature, top_k, top_p, min_p)
    greedy_ids = argmax_rows(filtered)  # greedy rows' filters are neutral: their own argmax
    probs = filtered.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    targets = (uniform * cdf[:, -1])[:, None]
    sampled_ids = torch.searchsorted(cdf, targets, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
    # A target rounded up to the row's total lands past its last drawable token: the greedy one.
    drawable = probs.gather(1, sampled_ids[:, None])[:, 0] > 0
    sampled_ids = torch.where(drawable, sampled_ids, greedy_ids)
    return torch.where(greedy, greedy_ids, sampled_ids)


# Candidates per row that decide most rows' top-k/top-p filter without sorting the whole row.
_TOP_CANDIDATES = 256


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The filter of _sorted_top_k_top_p from each row's _TOP_CANDIDATES largest logits where they
    decide it (top_k among them, or their mass past top_p), the whole row sorted only where they do
    not (a flat distribution, a top_k past them): sorting 64 rows of 49152 logits took 588 ms and
    scattering them back 687 ms on 2 vCPUs, the candidates ~30 ms. Rows with neither filter are
    left as they are."""
    vocab = logits.shape[-1]
    k = min(_TOP_CANDIDATES, vocab)
    values, ids = logits.topk(k, dim=-1)  # sorted, largest first; equal values in no defined order
    drop = torch.arange(k, device=logits.device)[None, :] >= top_k[:, None]
    # Each row's normalizer over its top-k set: inside the candidates, or (no top-k) the whole row.
    log_total = torch.where(top_k <= k, values.masked_fill(drop, float("-inf")).logsumexp(dim=-1),
                            logits.logsumexp(dim=-1))
    probs = (values - log_total[:, None]).exp().masked_fill(drop, 0.0)
    drop |= _outside_nucleus(probs, top_p)
    kept = (~drop).sum(dim=-1, keepdim=True)
    # The row keeps the candidates above its last kept one's value (the cut) and, of those equal to
    # it, the lowest indices (as many as were kept): every value equal to the cut is a candidate
    # unless the last candidate equals it too (then the row is sorted whole).
    cut = values.gather(1, kept - 1)
    above, tie = values > cut, values == cut
    tie_ids = ids.masked_fill(~tie, logits.shape[-1]).sort(dim=-1).values
    last_tie_id = tie_ids.gather(1, kept - 1 - above.sum(dim=-1, keepdim=True))
    keep = above | (tie & (ids <= last_tie_id))
    out = torch.full_like(logits, float("-inf")).scatter_(1, ids, values.masked_fill(~keep, float("-inf")))
    unfiltered = (top_k >= vocab) & (top_p >= 1)
    # Undecided: a top_k past the candidates but short of the vocabulary (its normalizer is not
    # theirs), every candidate inside the top-p mass (tokens past them may be kept too), or values
    # equal to the cut past the candidates.
    undecided = ~unfiltered & (((top_k > k) & ((top_k < vocab) | (kept[:, 0] == k))) | (values[:, -1] == cut[:, 0]))
    if unfiltered.any():
        out[unfiltered] = logits[unfiltered]
    if undecided.any():
        rows = undecided.nonzero()[:, 0]
        out[rows] = _sorted_top_k_top_p(logits[rows], top_k[rows], top_p[rows])
    return out


def _sorted_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """filter_rows' top-k/top-p filter by sorting every row whole (the definition)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= _outside_nucleus(probs, top_p)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _outside_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs sorted largest first, renormalized over the top-k set -> what top_p drops: a token
    when the mass before it already reaches top_p, never the first, nothing at top_p >= 1 (where a
    cumulative sum rounded to 1 would drop a tail of tiny probabilities)."""
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    drop[:, 0] = False
    return drop


def rotary_embedding_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on qk [tokens, heads, head_dim]: Hugging Face's rotate-half convention as
    x * cos + roll(x, head_dim / 2) * sin, with full-width tables whose sin is signed (-sin for
    the first half); see RotaryEmbedding.table."""
    qk.copy_(torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, dims=-1), sin))



def composed_qkv_attention(ops):
    """qkv_attention made of a backend module's rotary_embedding_, write_kv_cache and attention
    functions (this module's, or the Triton backend's, which has no fused version)."""

    def qkv_attention(
        qkv: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cu_query_lens: torch.Tensor | None,
        num_heads: int,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> torch.Tensor:
        """One attention layer after its fused projection: qkv [tokens, (num_heads + 2 *
        kv_heads) * head_dim] has its q and k heads rotated in place (cos and sin [tokens, 1,
        head_dim]; None: no rotary), k and v written to the cache at slot_mapping, then q attends:
        decode_attention when cu_query_lens is None (one query token per sequence), else
        paged_attention. Returns [tokens, num_heads * head_dim]."""
        kv_heads = k_cache.shape[2]
        head_dim = qkv.shape[1] // (num_heads + 2 * kv_heads)
        qk = qkv[:, : (num_heads + kv_heads) * head_dim].view(-1, num_heads + kv_heads, head_dim)
        if cos is not None:
            ops.rotary_embedding_(qk, cos, sin)
        v = qkv[:, (num_heads + kv_heads) * head_dim :].view(-1, kv_heads, head_dim)
        ops.write_kv_cache(qk[:, num_heads:], v, k_cache, v_cache, slot_mapping)
        q = qk[:, :num_heads]
        if cu_query_lens is None:
            out = ops.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                       soft_cap)
        else:
            out = ops.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_query_lens, scale,
                                      sliding_window, soft_cap)
        return out.reshape(-1, num_heads * head_dim)

    return qkv_attention


qkv_attention = composed_qkv_attention(sys.modules[__name__])


def projection(name: str, x: torch.Tensor, tensors: list, ints: list) -> torch.Tensor:
    """decoder_layer's projection: the registered op `name` ("namespace::name[.overload]") on x, its
    tensor and int arguments taken from the front of `tensors` and `ints` (consumed) in schema order
    (an int list: its length, then its elements), any other argument at its default (as
    kernels/csrc/step_ops.cpp's project)."""
    base, _, overload = name.partition(".")
    namespace, op_name = base.split("::")
    op = getattr(getattr(getattr(torch.ops, namespace), op_name), overload or "default")
    args = [x]
    for arg in op._schema.arguments[1:]:
        kind = str(arg.type)
        if arg.kwarg_only:  # at its default
            continue
        if kind in ("Tensor", "Optional[Tensor]"):
            args.append(tensors.pop(0))
        elif kind == "int":
            args.append(ints.pop(0))
        elif kind in ("List[int]", "List[SymInt]"):  # its length, then its elements
            length = ints.pop(0)
            args.append([ints.pop(0) for _ in range(length)])
        else:
            args.append(arg.default_value)
    return op(*args)


def composed_decoder_layer(ops):
    """decoder_layer made of a backend module's rms_norm, add_rms_norm, qkv_attention and silu_mul
    (this module's, or the C++ backend's: the unfused layer the fused op must equal bit for bit)."""

    def decoder_layer(
        residual: torch.Tensor, x: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
        context_lens: torch.Tensor, cu_query_lens: torch.Tensor | None, input_norm: torch.Tensor,
        post_norm: torch.Tensor, eps: float, projections: list[str], projection_tensors: list,
        projection_ints: list[int], num_heads: int, scale: float, sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> torch.Tensor:
        """A Llama-shaped decoder layer: residual += x (x None: the first layer, residual as is), its
        norm, the q/k/v projection (projections[0], by name: see projection), qkv_attention, the o
        projection, residual += it, its norm, gate/up, silu_mul, down. residual is updated in place;
        returns the MLP's output."""
        tensors, ints = list(projection_tensors), list(projection_ints)
        h = ops.rms_norm(residual, input_norm, eps) if x is None else ops.add_rms_norm(residual, x, input_norm, eps)
        qkv = projection(projections[0], h, tensors, ints)
        attended = ops.qkv_attention(qkv, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                     cu_query_lens, num_heads, scale, sliding_window, soft_cap)
        h = ops.add_rms_norm(residual, projection(projections[1], attended, tensors, ints), post_norm, eps)
        gate_up = projection(projections[2], h, tensors, ints)
        out = projection(projections[3], ops.silu_mul(gate_up), tensors, ints)
        if tensors or ints:
            raise ValueError(f"the projections left {len(tensors)} tensors and {len(ints)} ints unused")
        return out

    return decoder_layer


decoder_layer = composed_decoder_layer(sys.modules[__name__])
