"""qkv_attention: one attention layer after its fused q/k/v projection (rotation, cache write and
attention in one call), the C++ op (kernels/csrc/step_ops.cpp) against kernels/reference.py's
composition of the plain-torch ops, on random inputs with NaN in every cache slot no context owns
(seed printed; KERNEL_TEST_SEED=<n> replays it)."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_ops, reference
from tests.helpers import paged_kv
from tests.test_cpu_ops import TOL, assert_close


def step_of(gen, rows, num_heads, kv_heads, head_dim, block_size, dtype):
    """A step's inputs: sequences of (new tokens, context including them), their fused qkv rows,
    the caches (the new tokens' slots hold stale values the op must overwrite), the slots, and
    rotary tables at the tokens' positions."""
    k_cache, v_cache, tables, lens = paged_kv(gen, [c for _, c in rows], block_size, kv_heads, head_dim, dtype)
    positions = [p for q, c in rows for p in range(c - q, c)]
    seq_of = [i for i, (q, _) in enumerate(rows) for _ in range(q)]
    slots = torch.tensor([int(tables[s, p // block_size]) * block_size + p % block_size
                          for s, p in zip(seq_of, positions)])
    cu = torch.tensor([0] + [q for q, _ in rows]).cumsum(0).int()
    qkv = torch.randn(len(positions), (num_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    angles = torch.tensor(positions, dtype=torch.float)[:, None] * 10000 ** (-torch.arange(0, head_dim, 2) / head_dim)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :].to(dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], -1)[:, None, :].to(dtype)
    return qkv, cos, sin, k_cache, v_cache, slots, tables, lens, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "nope"])
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 1, 128, 8)], ids=str)
def test_qkv_attention_rotates_writes_the_cache_and_attends_as_the_reference(
    gen, dtype, decode, rotary, num_heads, kv_heads, head_dim, block_size
):
    # Decodes at a block's start, middle and end; mixed: a prefill, a chunk after cached context, a decode.
    rows = [(1, 1), (1, 2 * block_size), (1, 3 * block_size + 5)] if decode else [(37, 37), (20, 70), (1, 33)]
    qkv, cos, sin, k_cache, v_cache, slots, tables, lens, cu = step_of(
        gen, rows, num_heads, kv_heads, head_dim, block_size, dtype)
    tables_f = (cos, sin) if rotary else (None, None)
    cu_arg = None if decode else cu
    ours = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    out = cpu_ops.qkv_attention(ours[0], *tables_f, ours[1], ours[2], slots, tables, lens, cu_arg, num_heads,
                                head_dim**-0.5)
    theirs = [t.to(torch.float32, copy=True) for t in (qkv, k_cache, v_cache)]
    want = reference.qkv_attention(theirs[0], *(t if t is None else t.float() for t in tables_f), theirs[1],
                                   theirs[2], slots, tables, lens, cu_arg, num_heads, head_dim**-0.5)
    assert out.shape == (qkv.shape[0], num_heads * head_dim)
    assert_close(out, want, dtype)
    assert_close(ours[0], theirs[0], dtype)  # q and k rotated in place, v as it was
    assert torch.equal(ours[0][:, (num_heads + kv_heads) * head_dim :], qkv[:, (num_heads + kv_heads) * head_dim :])
    assert rotary != torch.equal(ours[0], qkv)
    for got, expected, before in zip(ours[1:], theirs[1:], [k_cache, v_cache]):
        torch.testing.assert_close(got.float(), expected, equal_nan=True, **TOL[dtype])
        assert not torch.equal(got.nan_to_num(), before.nan_to_num())  # the new tokens' slots were written


@pytest.mark.parametrize("window,soft_cap,kv_dtype", [(7, None, None), (None, 5.0, None), (None, None, torch.int8)])
def test_qkv_attention_is_the_backend_ops_in_one_call_with_variants_and_an_8bit_cache(gen, window, soft_cap, kv_dtype):
    num_heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    qkv, cos, sin, k_cache, v_cache, slots, tables, lens, cu = step_of(
        gen, [(1, 40), (12, 30), (1, 17)], num_heads, kv_heads, head_dim, block_size, torch.bfloat16)
    if kv_dtype is not None:
        k_cache, v_cache = (reference.quantize_rows(c.nan_to_num(), kv_dtype) for c in (k_cache, v_cache))
    ours = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    out = cpu_ops.qkv_attention(ours[0], cos, sin, ours[1], ours[2], slots, tables, lens, cu, num_heads, 0.125,
                                window, soft_cap)
    parts = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    composed = reference.composed_qkv_attention(cpu_ops)
    want = composed(parts[0], cos, sin, parts[1], parts[2], slots, tables, lens, cu, num_heads, 0.125, window, soft_cap)
    for got, expected in zip([out, *ours], [want, *parts]):
        assert torch.equal(got.view(torch.uint8).nan_to_num(), expected.view(torch.uint8).nan_to_num())


def test_qkv_attention_reads_a_strided_view_at_an_offset_as_its_contiguous_copy(gen):
    # The heads are views of qkv's storage (as_strided from its offset and row stride): a qkv that
    # is a column range of a wider buffer must give what its contiguous copy gives, bit for bit,
    # and leave the buffer's other columns alone.
    num_heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    qkv, cos, sin, k_cache, v_cache, slots, tables, lens, cu = step_of(
        gen, [(1, 40), (12, 30), (1, 17)], num_heads, kv_heads, head_dim, block_size, torch.bfloat16)
    wide = torch.randn(qkv.shape[0], qkv.shape[1] + 40, generator=gen).to(qkv.dtype)
    wide[:, 24 : 24 + qkv.shape[1]] = qkv
    before = wide.clone()
    view = wide[:, 24 : 24 + qkv.shape[1]]
    assert view.storage_offset() == 24 and view.stride(0) == qkv.shape[1] + 40
    ours = [k_cache.clone(), v_cache.clone()]
    out = cpu_ops.qkv_attention(view, cos, sin, *ours, slots, tables, lens, cu, num_heads, 0.125)
    dense = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    want = cpu_ops.qkv_attention(*dense[:1], cos, sin, *dense[1:], slots, tables, lens, cu, num_heads, 0.125)
    for got, expected in zip([out, view, *ours], [want, *dense]):
        assert torch.equal(got.view(torch.uint8).nan_to_num(), expected.view(torch.uint8).nan_to_num())
    assert torch.equal(wide[:, :24], before[:, :24]) and torch.equal(wide[:, 24 + qkv.shape[1] :], before[:, 24 + qkv.shape[1] :])


def test_qkv_attention_refuses_a_width_that_is_not_the_heads_times_head_dim(gen):
    qkv, cos, sin, k_cache, v_cache, slots, tables, lens, _ = step_of(gen, [(1, 5)], 4, 2, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="qkv's width"):
        cpu_ops.qkv_attention(qkv[:, :-1], cos, sin, k_cache, v_cache, slots, tables, lens, None, 4, 0.125)
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu_ops.qkv_attention(qkv, cos, None, k_cache, v_cache, slots, tables, lens, None, 4, 0.125)



def test_step_modules_run_their_forward_and_refuse_hooks_rather_than_ignore_them(gen):
    from engine.attention import AttentionBackend
    from engine.forward_context import forward_context
    from engine.layers.activation import SiluAndMul
    from engine.layers.norm import RMSNorm

    norm = RMSNorm(8, 1e-6)
    norm.weight.data = torch.rand(8, generator=gen)
    x, residual = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    with forward_context(None, AttentionBackend("torch", [], []), torch.arange(3)):
        out = norm(x, residual.clone())
    assert torch.equal(out, reference.rms_norm(x + residual, norm.weight, 1e-6))
    with pytest.raises(TypeError, match="hook its decoder layer"):
        norm.register_forward_hook(lambda *a: None)
    with pytest.raises(TypeError, match="hook its decoder layer"):
        SiluAndMul().register_forward_pre_hook(lambda *a: None)


def test_a_projection_is_a_step_module_with_its_forward_and_no_hooks(gen):
    from engine.layers.linear import Linear

    layer = Linear(8, 5, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 8, generator=gen))
        layer.bias.copy_(torch.randn(5, generator=gen))
    x = torch.randn(3, 8, generator=gen)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(TypeError, match="hook its decoder layer"):
        layer.register_forward_hook(lambda *a: None)
