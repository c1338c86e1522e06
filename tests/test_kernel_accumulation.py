"""Attention kernels accumulate in fp32 even when their inputs are bfloat16 or float16.

At a few hundred tokens and loose tolerances, a kernel that kept its running sums in the input's
half precision passes as well as one that keeps them in fp32. So: 2k-4k token contexts whose
values sit around 1 (random keys and queries, V = 1 + N(0, 0.25^2), so every one of thousands of
small terms matters to a sum near 1), the exact answer computed in float64, and a tolerance of
1.5 units in the last place of the output dtype: an fp32 accumulator lands within rounding of
the exact answer (measured <= 1 ulp), while half-precision running sums, even rounded only once
per 16-token block, land 6-10 ulps off. The last test proves that this tolerance rejects them.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from tests.helpers import paged_kv

CONTEXTS = [2100, 4096]  # one ends mid-block
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, SCALE = 6, 2, 64, 16, 0.125
PREFILL_TOKENS = 5  # query tokens at the end of each context in the prefill case
HALF = [torch.bfloat16, torch.float16]
# The Triton interpreter takes seconds per call at these lengths.
BACKENDS = ["reference", "cpu_ops", pytest.param("triton_attention", marks=pytest.mark.slow)]


def long_contexts(gen: torch.Generator, dtype: torch.dtype, query_tokens: int):
    """Paged caches holding CONTEXTS, and query_tokens queries at the end of each context."""
    k_cache, v_cache, tables, context_lens = paged_kv(gen, CONTEXTS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype)
    v_cache.copy_((1 + 0.25 * v_cache.float()).to(dtype))  # NaN padding stays NaN
    query = torch.randn(query_tokens * len(CONTEXTS), NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    cu_query_lens = torch.arange(len(CONTEXTS) + 1, dtype=torch.int32) * query_tokens
    return query, k_cache, v_cache, tables, context_lens, cu_query_lens


def gathered(cache: torch.Tensor, table: torch.Tensor, context_len: int) -> torch.Tensor:
    slots = (table[: math.ceil(context_len / BLOCK_SIZE)].long()[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE))
    return cache.flatten(0, 1)[slots.flatten()[:context_len]].float()


def attention(query, k_cache, v_cache, tables, context_lens, cu_query_lens, accumulate):
    """Causal paged attention the slow way: scores in fp32, then accumulate(p, v) -> output."""
    outputs = []
    starts = cu_query_lens.tolist()
    for i, context_len in enumerate(context_lens.tolist()):
        q = query[starts[i] : starts[i + 1]].float()
        group = NUM_HEADS // NUM_KV_HEADS
        k = gathered(k_cache, tables[i], context_len).repeat_interleave(group, 1)
        v = gathered(v_cache, tables[i], context_len).repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
        positions = torch.arange(context_len - len(q), context_len)
        scores = scores.masked_fill(torch.arange(context_len)[None, None, :] > positions[None, :, None], -math.inf)
        p = (scores - scores.amax(-1, keepdim=True)).exp()
        outputs.append(accumulate(p, v).transpose(0, 1))
    return torch.cat(outputs)


def exact_sums(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    p, v = p.double(), v.double()
    return torch.einsum("hqk,khd->hqd", p, v) / p.sum(-1)[..., None]


def half_precision_sums(dtype: torch.dtype):
    """Running sums kept in dtype across 16-token blocks (each block's own sum in fp32): the
    mildest way a kernel could accumulate in half precision."""

    def accumulate(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(p.shape[:2], dtype=dtype)
        acc = torch.zeros(p.shape[0], p.shape[1], v.shape[-1], dtype=dtype)
        for b in range(0, p.shape[-1], 16):
            total = (total.float() + p[..., b : b + 16].sum(-1)).to(dtype)
            acc = (acc.float() + torch.einsum("hqk,khd->hqd", p[..., b : b + 16], v[b : b + 16])).to(dtype)
        return (acc.float() / total.float()[..., None]).to(dtype)

    return accumulate


def assert_within_rounding(out: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == exact.shape
    torch.testing.assert_close(out.double(), exact, atol=0, rtol=1.5 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention_over_thousands_of_tokens_is_within_rounding_of_exact(gen, backend, dtype):
    kernels = importlib.import_module(f"kernels.{backend}")
    query, k_cache, v_cache, tables, context_lens, cu = long_contexts(gen, dtype, query_tokens=1)
    out = kernels.decode_attention(query, k_cache, v_cache, tables, context_lens, SCALE)
    assert_within_rounding(out, attention(query, k_cache, v_cache, tables, context_lens, cu, exact_sums), dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_attention_after_thousands_of_cached_tokens_is_within_rounding_of_exact(gen, backend, dtype):
    kernels = importlib.import_module(f"kernels.{backend}")
    query, k_cache, v_cache, tables, context_lens, cu = long_contexts(gen, dtype, query_tokens=PREFILL_TOKENS)
    out = kernels.paged_attention(query, k_cache, v_cache, tables, context_lens, cu, SCALE)
    assert_within_rounding(out, attention(query, k_cache, v_cache, tables, context_lens, cu, exact_sums), dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("query_tokens", [1, PREFILL_TOKENS], ids=["decode", "prefill"])
def test_the_tolerance_rejects_half_precision_accumulation(gen, dtype, query_tokens):
    inputs = long_contexts(gen, dtype, query_tokens)
    exact = attention(*inputs, exact_sums)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_within_rounding(attention(*inputs, half_precision_sums(dtype)), exact, dtype)
