"""The Triton kernels against their plain-torch references (kernels/reference.py).

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest) and
unchanged on a CUDA device with TRITON_INTERPRET=0. Inputs are drawn fresh every run; the seed is
printed (shown on failure) and KERNEL_TEST_SEED=<n> replays it (the gen fixture, conftest.py). Cache slots that no sequence owns
and every output buffer are filled with NaN first, so a kernel that reads past a context or leaves
an output unwritten fails loudly. Shapes stay tiny: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference, triton_attention, triton_ops  # noqa: E402
from kernels.triton_attention import attention  # noqa: E402
from tests.helpers import NAN, paged_kv  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
# fp32: only summation order differs. Half precision: the inputs are exactly representable, so
# the oracle is the reference in fp32; the kernels round P for the PV product (on GPU) and the output.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """Inclusive bounds."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


paged_kv = functools.partial(paged_kv, device=DEVICE)


def oracle(fn, query, k_cache, v_cache, *args):
    """The reference op in fp32 on inputs the kernel saw."""
    return fn(query.float(), k_cache.float(), v_cache.float(), *args)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "kernel left NaN in its output (unwritten rows or unmasked reads)"
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


# Head layouts: (query heads, KV heads, head_dim, block size). GQA ratios 1, 3 and 8; SmolLM2's
# 9/3 split; multi-query with 9 and 8 query heads; head dims that are and are not powers of two.
LAYOUTS = [
    pytest.param(4, 4, 64, 16, id="mha-d64-bs16"),
    pytest.param(9, 3, 80, 16, id="gqa3-9heads-d80-bs16"),
    pytest.param(16, 2, 96, 32, id="gqa8-d96-bs32"),
    pytest.param(8, 1, 128, 32, id="mqa8-d128-bs32"),
    pytest.param(9, 1, 64, 16, id="mqa-9heads-d64-bs16"),
]


def decode_contexts(gen, block_size: int, n: int = 4) -> list[int]:
    """Random lengths up to ~5 blocks, always with one exactly full last block and one single token."""
    ctx = [randint(gen, 2, 5 * block_size) for _ in range(n - 2)]
    return ctx + [randint(gen, 1, 3) * block_size, 1]


# ---------------------------------------------------------------- KV cache write


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 64, 16), (3, 80, 16), (8, 128, 32)])
def test_write_kv_cache_puts_tokens_in_their_slots_and_skips_minus_one(gen, dtype, num_kv_heads, head_dim, block_size):
    num_blocks, num_tokens = 4, 12
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:3]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    key = randn(gen, num_tokens, num_kv_heads, head_dim, dtype=dtype)
    value = randn(gen, num_tokens, num_kv_heads, head_dim, dtype=dtype)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, NAN, dtype=dtype, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    triton_ops.write_kv_cache(key, value, k_cache, v_cache, slots)
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


def test_write_kv_cache_reads_key_and_value_as_views_of_a_fused_qkv(gen):
    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 7, 9, 3, 80, 16
    qkv = randn(gen, num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    kv_width = num_kv_heads * head_dim
    key = qkv[:, num_heads * head_dim :][:, :kv_width].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, num_heads * head_dim + kv_width :].view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    slots = torch.randperm(3 * block_size, generator=gen)[:num_tokens].to(DEVICE)
    k_cache = torch.full((3, block_size, num_kv_heads, head_dim), NAN, device=DEVICE)
    v_cache = torch.full_like(k_cache, NAN)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    triton_ops.write_kv_cache(key, value, k_cache, v_cache, slots)
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_write_kv_cache_converts_to_the_cache_dtype(gen, cache_dtype):
    key, value = randn(gen, 5, 2, 64), randn(gen, 5, 2, 64)
    slots = torch.tensor([3, -1, 17, 0, 30], device=DEVICE)
    k_cache = torch.full((2, 16, 2, 64), NAN, dtype=cache_dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, NAN)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    triton_ops.write_kv_cache(key, value, k_cache, v_cache, slots)
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    # The interpreter truncates fp32 -> bf16 where CUDA rounds: allow one bf16 ulp.
    tol = dict(rtol=2**-7, atol=0) if cache_dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, **tol)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, **tol)


# ---------------------------------------------------------------- decode attention


@pytest.mark.parametrize("num_segments", [1, 3], ids=["one-pass", "split-k"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", LAYOUTS)
def test_decode_attention_matches_reference(gen, num_heads, num_kv_heads, head_dim, block_size, num_segments):
    ctx = decode_contexts(gen, block_size)
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, block_size, num_kv_heads, head_dim, torch.float32)
    query = randn(gen, len(ctx), num_heads, head_dim)
    scale = head_dim**-0.5
    out = attention(query, k_cache, v_cache, tables, context_lens, None, scale,
                    out=torch.full_like(query, NAN), num_segments=num_segments, block_n=16)
    expected = reference.decode_attention(query, k_cache, v_cache, tables, context_lens, scale)
    assert_matches(out, expected, torch.float32)
    assert_matches(triton_ops.decode_attention(query, k_cache, v_cache, tables, context_lens, scale),
                   expected, torch.float32)


def dense_decode_attention(query, k_cache, v_cache, tables, context_lens, scale):
    """Softmax attention written out per sequence and head: the oracle of the reference itself."""
    out = torch.zeros_like(query, dtype=torch.float32)
    group = query.shape[1] // k_cache.shape[2]
    for i, n in enumerate(context_lens.tolist()):
        k = reference._gather_context(k_cache, tables[i], n).float()  # [n, kv_heads, head_dim]
        v = reference._gather_context(v_cache, tables[i], n).float()
        for h in range(query.shape[1] if n else 0):
            weights = torch.softmax(k[:, h // group] @ query[i, h].float() * scale, dim=0)
            out[i, h] = weights @ v[:, h // group]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_decode_attention_is_softmax_attention_and_replans_after_in_place_edits(gen, dtype):
    """The CPU path plans its gather once a step and reuses it across layers: a plan must never
    outlive an in-place change to the block tables or context lengths."""
    ctx = decode_contexts(gen, 16) + [0]
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, 16, 3, 64, dtype)
    query = randn(gen, len(ctx), 9, 64, dtype=dtype)
    for _ in range(2):  # the second call reuses the plan
        out = reference.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125)
        assert_matches(out, dense_decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125), dtype)
    tables[[0, 1]] = tables[[1, 0]]  # sequences 0 and 1 trade places, then 0 loses its last token
    context_lens[[0, 1]] = context_lens[[1, 0]]
    context_lens[0] -= 1
    out = reference.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125)
    assert_matches(out, dense_decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_segments", [1, 2], ids=["one-pass", "split-k"])
def test_decode_attention_in_half_precision_accumulates_in_fp32(gen, dtype, num_segments):
    num_heads, num_kv_heads, head_dim, block_size = 9, 3, 80, 16
    ctx = decode_contexts(gen, block_size)
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, block_size, num_kv_heads, head_dim, dtype)
    query = randn(gen, len(ctx), num_heads, head_dim, dtype=dtype)
    out = attention(query, k_cache, v_cache, tables, context_lens, None, 0.1,
                    out=torch.full_like(query, NAN), num_segments=num_segments, block_n=32)
    assert out.dtype == dtype
    expected = oracle(reference.decode_attention, query, k_cache, v_cache, tables, context_lens, 0.1)
    assert_matches(out, expected, dtype)
    # The CPU backend runs the reference in the input dtype: it must agree with itself in fp32.
    assert_matches(reference.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.1), expected, dtype)


@pytest.mark.parametrize("num_segments", [2, 5, 16])
def test_decode_attention_partitions_merge_across_boundaries(gen, num_segments):
    """Contexts land on, just before and just after partition edges; more partitions than some
    sequences have tokens leaves empty partitions that must weigh nothing."""
    block_size, width = 16, 8
    segment = math.ceil(math.ceil(width * block_size / num_segments) / 16) * 16
    ctx = [segment, segment + 1, min(2 * segment - 1, width * block_size), 3, width * block_size]
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, block_size, 2, 64, torch.float32,
                                                      extra_width=width - math.ceil(max(ctx) / block_size))
    assert tables.shape[1] == width
    query = randn(gen, len(ctx), 6, 64)
    out = attention(query, k_cache, v_cache, tables, context_lens, None, 0.125,
                    out=torch.full_like(query, NAN), num_segments=num_segments, block_n=16)
    assert_matches(out, reference.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125), torch.float32)


def test_decode_attention_splits_a_long_context_on_its_own(gen):
    """One long sequence cannot fill the device with one program per KV head: the public function
    partitions it without being told."""
    ctx, block_size, num_kv_heads = [700], 32, 1
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, block_size, num_kv_heads, 64, torch.float32)
    assert triton_attention._pick_segments(num_kv_heads, tables.shape[1] * block_size, DEVICE) > 1
    query = randn(gen, 1, 8, 64)
    out = triton_ops.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125)
    assert_matches(out, reference.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125), torch.float32)


@pytest.mark.parametrize("num_segments", [1, 2], ids=["one-pass", "split-k"])
def test_decode_attention_of_an_empty_context_is_zero(gen, num_segments):
    """Padded batch rows (e.g. CUDA-graph padding) have context length 0: zeros, like the reference."""
    k_cache, v_cache, tables, context_lens = paged_kv(gen, [40, 1], 16, 2, 64, torch.float32)
    context_lens[1] = 0
    query = randn(gen, 2, 4, 64)
    out = attention(query, k_cache, v_cache, tables, context_lens, None, 0.125,
                    out=torch.full_like(query, NAN), num_segments=num_segments, block_n=16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_matches(out, reference.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125), torch.float32)


# ---------------------------------------------------------------- mixed prefill + decode attention


# Split-K's reduce runs one interpreter program per (query token, query head), ~10 ms each: split-K
# runs take the mixed batch with chunks of at most this many tokens (contexts, hence segment edges,
# unchanged; the fresh prefill still crosses them). The one-pass runs keep chunks of up to 69.
SPLIT_K_MAX_CHUNK = 12


def mixed_batch(gen, block_size: int, num_heads: int, head_dim: int, max_chunk: int = 69):
    """(query_len, context_len) per sequence: a fresh prefill, prefill chunks (of up to max_chunk
    tokens) after cached context (prefix-cache hit / chunked prefill, one starting mid-block),
    decodes, and a sequence with no query tokens this step."""
    fresh = randint(gen, 2, 40)
    cached = randint(gen, 1, 3) * block_size  # a prefix hit is whole blocks
    chunked_ctx = randint(gen, 20, 70)
    chunked_q = randint(gen, 2, min(chunked_ctx - 1, max_chunk))
    hit_q = randint(gen, 2, min(20, max_chunk))
    seqs = [(fresh, fresh), (hit_q, 0), (chunked_q, chunked_ctx), (1, randint(gen, 1, 70)),
            (0, randint(gen, 1, 30)), (1, randint(gen, 1, 70))]
    seqs[1] = (seqs[1][0], cached + seqs[1][0])
    query_lens = [q for q, _ in seqs]
    cu = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return [c for _, c in seqs], cu.to(DEVICE)


@pytest.mark.parametrize("num_segments", [1, 3], ids=["one-pass", "split-k"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", LAYOUTS)
def test_paged_attention_runs_a_mixed_batch_in_one_launch(gen, num_heads, num_kv_heads, head_dim, block_size, num_segments):
    split = num_segments > 1
    ctx, cu = mixed_batch(gen, block_size, num_heads, head_dim, **(dict(max_chunk=SPLIT_K_MAX_CHUNK) if split else {}))
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, block_size, num_kv_heads, head_dim, torch.float32)
    query = randn(gen, int(cu[-1]), num_heads, head_dim)
    scale = head_dim**-0.5
    out = attention(query, k_cache, v_cache, tables, context_lens, cu, scale,
                    out=torch.full_like(query, NAN), num_segments=num_segments, block_n=16)
    expected = reference.paged_attention(query, k_cache, v_cache, tables, context_lens, cu, scale)
    assert_matches(out, expected, torch.float32)
    if not split:  # the public function picks its own segments: once per layout is enough
        assert_matches(triton_ops.paged_attention(query, k_cache, v_cache, tables, context_lens, cu, scale),
                       expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_in_half_precision(gen, dtype):
    ctx, cu = mixed_batch(gen, 16, 9, 80)
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, 16, 3, 80, dtype)
    query = randn(gen, int(cu[-1]), 9, 80, dtype=dtype)
    out = attention(query, k_cache, v_cache, tables, context_lens, cu, 0.1, out=torch.full_like(query, NAN))
    expected = oracle(reference.paged_attention, query, k_cache, v_cache, tables, context_lens, cu, 0.1)
    assert_matches(out, expected, dtype)
    assert_matches(reference.paged_attention(query, k_cache, v_cache, tables, context_lens, cu, 0.1), expected, dtype)


def test_paged_attention_long_prefills_use_tall_query_tiles(gen):
    """Many query tokens per sequence switch to 64-row tiles; causality must hold inside a tile."""
    ctx = [100, 70]
    cu = torch.tensor([0, 100, 130], dtype=torch.int32, device=DEVICE)  # fresh prefill; chunk after 40 cached
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, 16, 2, 64, torch.float32)
    query = randn(gen, 130, 4, 64)
    out = attention(query, k_cache, v_cache, tables, context_lens, cu, 0.125, out=torch.full_like(query, NAN))
    assert_matches(out, reference.paged_attention(query, k_cache, v_cache, tables, context_lens, cu, 0.125), torch.float32)


@pytest.mark.parametrize(
    "dtype,num_segments",
    [(torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 4)],
    ids=["fp32-one-pass", "fp32-split-k", "bf16-split-k"],
)
def test_paged_attention_at_long_context(gen, dtype, num_segments):
    """Long prompts: a chunk after ~1,500 cached tokens (chunked prefill, a prefix hit on a long
    document) beside a decode at ~2,000 tokens and a short one, through dozens of key tiles and
    across partition edges. One KV head and 64-key tiles keep the interpreter to seconds."""
    chunk, cached = randint(gen, 17, 30), randint(gen, 1400, 1600)
    rows = [(chunk, cached + chunk), (1, randint(gen, 1900, 2100)), (1, randint(gen, 1, 40))]
    k_cache, v_cache, tables, context_lens = paged_kv(gen, [c for _, c in rows], 16, 1, 64, dtype)
    cu = torch.tensor([0] + [q for q, _ in rows], dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    query = randn(gen, int(cu[-1]), 4, 64, dtype=dtype)
    out = attention(query, k_cache, v_cache, tables, context_lens, cu, 0.125,
                    out=torch.full_like(query, NAN), num_segments=num_segments, block_n=64)
    expected = oracle(reference.paged_attention, query, k_cache, v_cache, tables, context_lens, cu, 0.125)
    assert_matches(out, expected, dtype)


def test_paged_attention_of_a_decode_only_batch_equals_decode_attention(gen):
    ctx = decode_contexts(gen, 16, n=5)
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, 16, 3, 64, torch.float32)
    query = randn(gen, len(ctx), 9, 64)
    cu = torch.arange(len(ctx) + 1, dtype=torch.int32, device=DEVICE)
    mixed = triton_ops.paged_attention(query, k_cache, v_cache, tables, context_lens, cu, 0.125)
    decode = triton_ops.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125)
    torch.testing.assert_close(mixed, decode, **TOL[torch.float32])


# ---------------------------------------------------------------- variants: sliding window, soft-capping


@pytest.mark.parametrize("window,soft_cap,num_segments", [(1, None, 1), (5, None, 3), (20, 5.0, 3), (45, None, 1),
                                                         (None, 5.0, 1)])
def test_paged_and_decode_attention_take_a_sliding_window_and_soft_cap(gen, window, soft_cap, num_segments):
    """Windows of one token, inside a 16-token block and key tile, and across several; contexts
    of a mixed batch up to ~70 tokens; scores large enough to reach the cap."""
    ctx, cu = mixed_batch(gen, 16, 6, 64, **(dict(max_chunk=SPLIT_K_MAX_CHUNK) if num_segments > 1 else {}))
    k_cache, v_cache, tables, context_lens = paged_kv(gen, ctx, 16, 2, 64, torch.float32)
    query = randn(gen, int(cu[-1]), 6, 64) * 3
    args = (tables, context_lens, cu, 0.125, window, soft_cap)
    out = attention(query, k_cache, v_cache, *args, out=torch.full_like(query, NAN), num_segments=num_segments,
                    block_n=16)
    assert_matches(out, reference.paged_attention(query, k_cache, v_cache, *args), torch.float32)
    rows = [i for i in range(len(ctx)) if cu[i + 1] > cu[i]]  # each sequence's last query token
    last = (cu[1:] - 1)[rows].long()
    sub = (tables[rows], context_lens[rows], 0.125, window, soft_cap)
    out = attention(query[last], k_cache, v_cache, sub[0], sub[1], None, 0.125, window, soft_cap,
                    out=torch.full_like(query[last], NAN), num_segments=num_segments, block_n=16)
    assert_matches(out, reference.decode_attention(query[last], k_cache, v_cache, *sub), torch.float32)


def test_bad_variant_values_are_refused(gen):
    k_cache, v_cache, tables, context_lens = paged_kv(gen, [20], 16, 1, 64, torch.float32)
    query = randn(gen, 1, 2, 64)
    with pytest.raises(ValueError, match="sliding_window"):
        triton_ops.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125, 0)
    with pytest.raises(ValueError, match="soft_cap"):
        triton_ops.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125, None, 0.0)


# ---------------------------------------------------------------- block copies


def random_pools(gen, num_layers, num_blocks, dtype, block_shape=(16, 2, 64)):
    """Per-layer K and V caches as views of one allocation, the way an engine lays them out."""
    pool = randn(gen, num_layers, 2, num_blocks, *block_shape, dtype=dtype)
    return [pool[i, 0] for i in range(num_layers)], [pool[i, 1] for i in range(num_layers)]


def cow_mapping(gen, num_blocks: int, n: int) -> torch.Tensor:
    """Distinct sources and distinct, disjoint destinations (as copy-on-write produces)."""
    ids = torch.randperm(num_blocks, generator=gen)
    return torch.stack([ids[:n], ids[n : 2 * n]], 1).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_blocks_copies_every_layer_at_once(gen, dtype):
    k_caches, v_caches = random_pools(gen, 3, 10, dtype)
    mapping = cow_mapping(gen, 10, 4)
    k_ref, v_ref = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    triton_ops.copy_blocks(k_caches, v_caches, mapping)
    reference.copy_blocks(k_ref, v_ref, mapping)
    for got, want in zip(k_caches + v_caches, k_ref + v_ref):
        assert torch.equal(got, want)


def test_copy_blocks_handles_layers_of_different_layouts(gen):
    k_caches = [randn(gen, 6, 16, 2, 64), randn(gen, 6, 32, 1, 80, dtype=torch.float16)]
    v_caches = [randn(gen, 6, 16, 2, 64), randn(gen, 6, 32, 1, 80, dtype=torch.float16)]
    mapping = cow_mapping(gen, 6, 2)
    k_ref, v_ref = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    triton_ops.copy_blocks(k_caches, v_caches, mapping)
    reference.copy_blocks(k_ref, v_ref, mapping)
    for got, want in zip(k_caches + v_caches, k_ref + v_ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_swap_blocks_moves_blocks_between_pools(gen, dtype):
    src = randn(gen, 7, 16, 3, 80, dtype=dtype)
    dst = torch.full((5, 16, 3, 80), NAN, dtype=dtype, device=DEVICE)
    mapping = torch.stack([torch.randperm(7, generator=gen)[:3], torch.randperm(5, generator=gen)[:3]], 1)
    want = dst.clone()
    reference.swap_blocks(src, want, mapping)
    triton_ops.swap_blocks(src, dst, mapping)  # mapping on the host, as the scheduler builds it
    torch.testing.assert_close(dst, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device beside the CPU")
@pytest.mark.parametrize("direction", ["out-to-cpu", "in-to-gpu"])
def test_swap_blocks_crosses_devices(gen, direction):
    gpu = randn(gen, 6, 16, 2, 64, dtype=torch.float16)
    cpu = torch.randn(6, 16, 2, 64, generator=gen).half()
    src, dst = (gpu, cpu) if direction == "out-to-cpu" else (cpu, gpu)
    mapping = torch.tensor([[0, 5], [3, 1]])
    want = dst.clone()
    reference.swap_blocks(src, want, mapping)
    triton_ops.swap_blocks(src, dst, mapping)
    assert torch.equal(dst, want)


# ---------------------------------------------------------------- contracts


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above run the compiled kernels")
def test_every_kernel_compiles_for_a_gpu_on_a_machine_without_one():
    """The interpreter runs kernels as Python (a `return` in a constexpr branch skips the code
    after it; the compiler generates it) and computes every dot in fp32 (the half-precision paths
    never run). tests/triton_compile.py compiles each launch the wrappers make for sm_80, through
    Triton's GPU IR: attention, decode and mixed, over bf16/fp16/fp32 caches and (bf16 queries)
    int8 and e4m3 ones, with and without the window/soft-cap variants and split-K; the cache
    writes; the fused MoE in bf16, fp16 and fp32."""
    done = subprocess.run([sys.executable, "-m", "tests.triton_compile"], cwd=Path(__file__).parents[1],
                          env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for kernel in ("_paged_attention_kernel", "_reduce_segments_kernel", "_write_kv_cache_kernel",
                   "_write_kv_cache_quant_kernel", "_gate_up_kernel", "_down_kernel"):
        assert kernel in done.stdout, kernel


def test_per_step_integers_never_compile_a_triton_kernel_again():
    """tests/triton_compile.py --specializations binds the launches of decode and mixed steps of
    1-70 sequences over block tables 1-40 wide, cache writes, MoE steps and the per-token kernels
    over as many rows, with Triton's own binder for a GPU: each kernel gets one specialization per
    constexpr choice. An integer argument of 1 or a multiple of 16 used to add one (a 0.6 s compile
    on an H200 when a server first saw such a batch). The constexpr choices themselves (attention's
    tile height, split-K or not) are a few per model, each compiled once per process."""
    done = subprocess.run([sys.executable, "-m", "tests.triton_compile", "--specializations"],
                          cwd=Path(__file__).parents[1], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "each compiles once" in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU bench/gpu_check.sh times the kernels themselves")
def test_8bit_cache_rows_on_a_gpu_are_read_16_bytes_at_a_time():
    """The decode attention's PTX for sm_90 over int8 and e4m3 caches: rows padded as the engine
    lays them out on CUDA read their codes in 8-16 byte copies; unpadded rows (head_dim + 2 bytes)
    read them byte by byte, which made an 8-bit cache 3-37x slower than bf16 on an H200."""
    done = subprocess.run([sys.executable, "-m", "tests.triton_compile", "--vector-loads"],
                          cwd=Path(__file__).parents[1], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if " rows of " in line]
    assert len(lines) == 4, done.stdout[-2000:]
    for line in lines:
        single = int(line.split(": ")[1].split()[0])
        # 144-byte rows: the scales' bytes alone; 130-byte rows: every code (the check can fail).
        assert (single <= 32) if "rows of 144 bytes" in line else (single >= 64), line


def test_triton_ops_has_the_reference_signatures():
    for name in ["write_kv_cache", "decode_attention", "paged_attention", "copy_blocks", "swap_blocks"]:
        assert inspect.signature(getattr(triton_ops, name)) == inspect.signature(getattr(reference, name)), name


def test_reference_ignores_garbage_past_a_context(gen):
    """Regression: the reference decode path gathers up to the batch's longest context and used to
    let NaN in a shorter sequence's unused slots through the mask (NaN * 0)."""
    k_cache, v_cache, tables, context_lens = paged_kv(gen, [40, 5], 16, 1, 64, torch.float32)
    query = randn(gen, 2, 2, 64)
    assert not reference.decode_attention(query, k_cache, v_cache, tables, context_lens, 0.125).isnan().any()


# ---------------------------------------------------------------- benchmark script

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_kernels.py")


def run_bench(*args: str, hide_gpu: bool = False):
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if hide_gpu else None
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=120, env=env)


def test_bench_parses_its_arguments():
    assert run_bench("--help").returncode == 0
    bad = run_bench("--num-heads", "9", "--num-kv-heads", "2")
    assert bad.returncode == 2 and "multiple of --num-kv-heads" in bad.stderr


def test_bench_refuses_clearly_without_cuda():
    done = run_bench("--batch-sizes", "1", "--context-lens", "512", hide_gpu=True)
    assert done.returncode == 1
    assert "needs a CUDA GPU" in done.stderr
