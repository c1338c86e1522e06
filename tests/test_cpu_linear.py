"""Projections on CPU run through oneDNN with packed weights, and give F.linear's results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM
from engine.layers import linear_kernels as linear
from engine.layers.linear import Linear
from engine.layers.linear_kernels import (amx_linear_ops, avx512_bf16_ops, can_pack_for_cpu, f32_strips_ops, packed_rows,
                                          strips_ops)

pytestmark = pytest.mark.skipif(
    not can_pack_for_cpu(torch.device("cpu"), torch.float32), reason="this torch build has no oneDNN"
)
# oneDNN packs bfloat16 only where the CPU has AVX512-BW or AVX-NE-CONVERT.
PACKS_BF16 = can_pack_for_cpu(torch.device("cpu"), torch.bfloat16)
needs_bf16_packing = pytest.mark.skipif(not PACKS_BF16, reason="oneDNN cannot pack bfloat16 on this CPU")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packing)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 17, 64, 65, 100, 1000])  # from 65: padded to a bucket
def test_packed_linear_equals_f_linear(dtype, bias, rows):
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(96, 160, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(160, 96, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(160, generator=gen))
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    expected = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())

    # bfloat16 on AMX or AVX512-BF16: column strips (kernels/csrc/amx_linear.cpp, bf16_linear.cpp);
    # float32 where our AVX-512 kernels run: f32_linear.cpp's strips.
    strips = (strips_ops() if dtype == torch.bfloat16 else f32_strips_ops()) is not None
    assert layer.finalize(None, 32, pack=True) == ("strips" if strips else "packed")
    assert layer.packed_weight is not None and layer.weight is None  # one copy: the packed one
    assert layer.strips == strips
    with torch.inference_mode():
        out = layer(x)
        # Rows gathered from a larger batch (the LM head's input) are not contiguous in memory.
        strided = layer(torch.cat([x, x]).view(2, rows, 96).transpose(0, 1)[:, 1])
    assert out.dtype == dtype and out.shape == (rows, 160)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])
    torch.testing.assert_close(strided.float(), expected, **TOL[dtype])


def test_the_engine_packs_every_projection_on_cpu(tiny_path):
    model = LLM(str(tiny_path), num_kv_blocks=16).engine.runner.model_runner.model
    projections = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(projections) == 4 * model.config.num_layers + 1
    assert all(m.packed_weight is not None for m in projections if m is not model.lm_head)
    # The tied LM head multiplies with the embedding's own tensor: packing it would be a second copy.
    assert model.lm_head.packed_weight is None if model.lm_head.tied else model.lm_head.packed_weight is not None


def test_packed_matmuls_run_at_a_bounded_set_of_row_counts():
    """oneDNN keeps a kernel per row count for good (~0.3 MB each): every count up to the token
    budget would grow a server by gigabytes. Small counts (decode batches) run exact; from 64 up
    they round up by at most 12.5%."""
    counts = {packed_rows(m) for m in range(1, 2049)}
    assert len(counts) <= 64 + 8 * 5
    for m in range(1, 4097):
        assert m <= packed_rows(m) <= m + m // 8 and (m > 64 or packed_rows(m) == m)


@pytest.mark.parametrize("cols", [96, 95])  # odd: not in bfloat16 pairs, never on AMX
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 17, 64, 65])
def test_a_float_bfloat16_weight_gives_f_linear_results_at_any_row_count(rows, cols):
    """A weight kept in float (the tied LM head) runs up to 64 rows on AMX where the CPU has it
    (bf16_mm_amx), else on AVX512-BF16 where it has that (bf16_mm_rows), else one row through ATen's GEMV (torch.mv) and up to 16 with the weight as
    the left operand; more through F.linear: all agree with the float32 product, in dense rows,
    also for strided input rows (odd offsets too)."""
    gen = torch.Generator().manual_seed(7)
    layer = Linear(cols, 1001, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1001, cols, generator=gen))
    assert layer.finalize(None, 32, pack=False) == "float"
    x = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float())
    with torch.inference_mode():
        out = layer(x)
        strided = layer(torch.cat([x, x], dim=1)[:, cols:])
        odd_offset = layer(torch.cat([x[:, :1], x], dim=1)[:, 1:])  # rows cols + 1 apart
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1001) and out.is_contiguous()
    for result in (out, strided, odd_offset):
        torch.testing.assert_close(result.float(), expected, **TOL[torch.bfloat16])


def amx_ops():
    from engine.layers.quant_kernels import amx_kernels

    return amx_kernels()


needs_amx = pytest.mark.skipif(amx_ops() is None, reason="no AMX-BF16 or no C++ kernels on this machine")


@needs_amx
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 64, 257])
@pytest.mark.parametrize("out_features, in_features", [(1001, 96), (37, 34), (64, 576)])
def test_the_amx_bfloat16_matmul_equals_the_float_product(rows, out_features, in_features):
    """bf16_mm_amx (kernels/csrc/gemv_ops.cpp) against the float32 product on random inputs:
    output widths not a multiple of its 64-column blocks, row counts across its 64-row chunks
    (257 = 4 x 64 + 1), accumulation in float32 (the error is bfloat16's rounding of the result)."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    out = amx_ops().bf16_mm_amx(x, weight)
    expected = x.float() @ weight.float().T
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    torch.testing.assert_close(out.float(), expected, atol=1e-2 * in_features**0.5, rtol=1e-2)


@needs_amx
def test_the_amx_bfloat16_matmul_refuses_what_it_cannot_read():
    ops = amx_ops()
    weight = torch.randn(64, 96).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="K even"):
        ops.bf16_mm_amx(torch.randn(2, 95).to(torch.bfloat16), torch.randn(64, 95).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="columns"):
        ops.bf16_mm_amx(torch.randn(2, 94).to(torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="bfloat16 matrix"):
        ops.bf16_mm_amx(torch.randn(2, 96), weight)


needs_bf16_rows = pytest.mark.skipif(linear.avx512_bf16_ops() is None, reason="no AVX512-BF16 or no C++ kernels here")


def mm_rows_at(threads: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gemv_ops.cpp's few-row matmul of x's dtype (bf16_mm_rows, f32_mm_rows) on `threads` threads."""
    ops = linear.avx512_bf16_ops()
    op = ops.bf16_mm_rows if x.dtype == torch.bfloat16 else ops.f32_mm_rows
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return op(x, weight)
    finally:
        torch.set_num_threads(previous)


def assert_bfloat16_product(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Against the exact product (float64): a product of two bfloat16 values is exact in float32 (8 x 8
    significant bits), the K-term sums in float32 in any order err by at most K 2^-24 sum_k |x_k w_k|
    (allowed twice that), and the sum is rounded once to bfloat16 (half of its 2^-7 relative spacing).
    So the bound scales with K and |x| |w|, and is tight where a result is large."""
    exact = x.double() @ weight.double().T
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape and out.is_contiguous()
    sums_error = x.shape[1] * 2.0**-23 * (x.double().abs() @ weight.double().abs().T)
    error, bound = (out.double() - exact).abs(), 2.0**-8 * exact.abs() + (1 + 2.0**-7) * sums_error
    assert (error <= bound).all(), f"worst error {(error - bound).max().item()} past the bound"
    # and near the float32 product as before: for random signs float32's summation error grows as
    # sqrt(K), not K, so where results cancel this is the tighter check
    torch.testing.assert_close(out.float(), x.float() @ weight.float().T, atol=1e-4 * max(1, x.shape[1]) ** 0.5, rtol=2**-8)


@needs_bf16_rows
# 34, 2, 100: a masked last chunk of 17, 1 and 2 pairs; 95: odd (the last pair half a pair)
@pytest.mark.parametrize("in_features", [2, 34, 95, 100, 576, 2048])
@pytest.mark.parametrize("out_features", [1, 15, 16, 17, 1000])  # 1000: 62 blocks of 16 and 8 more
# tiles of 4 x 4, then 8 x 2, then 16 x 1; the next block's prefetch spread over 1, 2, 4, 16 or 64
# groups of 4 rows (4, 8, 16, 64, 257)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 63, 64, 257])
def test_the_avx512_bfloat16_matmul_equals_the_float_product(rows, out_features, in_features):
    """bf16_mm_rows (kernels/csrc/gemv_ops.cpp) against the float32 product on random inputs, on
    one and two threads (each thread's share of the blocks ends wherever the split falls), for
    dense input rows and rows of a wider tensor (not contiguous), on any CPU with AVX512-BF16."""
    gen = torch.Generator().manual_seed(rows * 100_000 + out_features * 10 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    wide = torch.randn(rows, in_features + 3, generator=gen).to(torch.bfloat16)
    for x in (wide[:, 3:].contiguous(), wide[:, 3:]):
        for threads in (1, 2):
            assert_bfloat16_product(mm_rows_at(threads, x, weight), x, weight)


@needs_bf16_rows
@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("out_features, in_features", [(49152, 576), (1000, 95), (17, 2048)])
def test_the_avx512_bfloat16_matmul_at_one_row_is_the_float_product_on_both_loops(streaming, out_features, in_features):
    """bf16_mm_rows at one row (the tied LM head at batch 1) on each of its loops, whichever this CPU's
    rule takes (set_bf16_mm_rows_streaming: each weight row read whole, or the block's rows a chunk at
    a time), on one and two threads: the same bound as every other row count."""
    gen = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, in_features, generator=gen).to(torch.bfloat16)
    ops = linear.avx512_bf16_ops()
    ops.set_bf16_mm_rows_streaming(streaming)
    try:
        for threads in (1, 2):
            assert_bfloat16_product(mm_rows_at(threads, x, weight), x, weight)
    finally:
        ops.set_bf16_mm_rows_streaming(None)  # the CPU's rule again


@needs_bf16_rows
def test_the_avx512_bfloat16_matmul_reads_the_default_models_head_and_any_input_layout():
    """The default model's head shape (49152 x 576) at 1 and 3 rows, and inputs whose columns are
    not contiguous (copied first) or that have no rows."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(49152, 576, generator=gen).to(torch.bfloat16)
    for rows in (1, 3):
        x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
        assert_bfloat16_product(mm_rows_at(2, x, weight), x, weight)
    x = torch.randn(576, 2, generator=gen).to(torch.bfloat16).T  # column stride 2
    assert_bfloat16_product(mm_rows_at(1, x, weight[:100].contiguous()), x, weight[:100])
    assert mm_rows_at(1, x[:0], weight).shape == (0, 49152)


@needs_bf16_rows
@pytest.mark.parametrize("dtype, op", [(torch.bfloat16, "bf16_mm_rows"), (torch.float32, "f32_mm_rows")])
def test_a_plain_weights_few_rows_run_on_the_avx512_matmul_of_its_dtype(monkeypatch, dtype, op):
    """A plain weight (the tied LM head's path: few_rows_bfloat16 / few_rows_float32) multiplies up to
    AMX_FEW_ROWS rows on gemv_ops.cpp's loops: bfloat16 on bf16_mm_rows where there is no AMX,
    float32 on f32_mm_rows; F.linear beyond. The results are the float product's."""
    real, calls = linear.avx512_bf16_ops(), []

    class Spy:
        def __getattr__(self, name):
            assert name == op

            def spy(x, weight):
                calls.append(x.shape[0])
                return getattr(real, name)(x, weight)

            return spy

    monkeypatch.setattr(linear, "avx512_bf16_ops", Spy)
    layer = Linear(96, 100, bias=False).to(dtype)
    assert layer.finalize(None, 32, pack=False) == "float"
    with torch.inference_mode():
        for rows in (1, 3, linear.AMX_FEW_ROWS, linear.AMX_FEW_ROWS + 1):
            x = torch.randn(rows, 96).to(dtype)
            torch.testing.assert_close(layer(x).float(), F.linear(x.float(), layer.weight.float()), **TOL[dtype])
    few = [1, 3, linear.AMX_FEW_ROWS]
    assert calls == ([] if dtype == torch.bfloat16 and amx_ops() is not None else few)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_off_the_cpu_a_few_row_projection_is_one_matmul_with_no_copy(dtype):
    """The few-row paths above are the CPU's. On another device (a GPU; here the meta device, which
    runs the same dispatch without data) a plain weight's few rows go to F.linear: one matmul, no
    transposed product and copy (which cost a GPU decode step 89 extra copies on an H200)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    layer = Linear(96, 100, bias=False).to(device="meta", dtype=dtype)
    for rows in (1, 3, linear.AMX_FEW_ROWS):
        ops = []
        with torch.inference_mode(), Record():
            y = layer(torch.empty(rows, 96, device="meta", dtype=dtype))
        assert y.shape == (rows, 100)
        matmuls = [op for op in ops if op in ("linear", "mm", "addmm", "mv")]
        assert matmuls in (["linear"], ["mm"]) and not {"clone", "copy_"} & set(ops), (rows, ops)


@needs_bf16_rows
def test_the_avx512_bfloat16_matmul_refuses_what_it_cannot_read():
    ops = linear.avx512_bf16_ops()
    weight = torch.randn(64, 96).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="columns"):
        ops.bf16_mm_rows(torch.randn(2, 94).to(torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="bfloat16 matrix"):
        ops.bf16_mm_rows(torch.randn(2, 96), weight)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.bf16_mm_rows(torch.randn(2, 64).to(torch.bfloat16), weight.T)
    with pytest.raises(RuntimeError, match="bfloat16 matrix"):
        ops.bf16_mm_rows(torch.randn(2, 96).to(torch.bfloat16), weight.float())


def assert_float32_product(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Against the exact product (float64): each product rounds once (2^-24 relative) and K-term
    float32 sums in any order err by at most K 2^-24 sum_k |x_k w_k| (allowed twice that)."""
    exact = x.double() @ weight.double().T
    assert out.dtype == torch.float32 and out.shape == exact.shape and out.is_contiguous()
    bound = (x.shape[1] + 1) * 2.0**-23 * (x.double().abs() @ weight.double().abs().T)
    error = (out.double() - exact).abs()
    assert (error <= bound).all(), f"worst error {(error - bound).max().item()} past the bound"


@needs_bf16_rows
# 1, 15, 17, 33: a masked last chunk of 1, 15, 1 and 1 floats; 16, 576: none
@pytest.mark.parametrize("in_features", [1, 15, 16, 17, 33, 576])
@pytest.mark.parametrize("out_features", [1, 15, 16, 17, 1000])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17, 64, 257])
def test_the_avx512_float32_matmul_equals_the_exact_product(rows, out_features, in_features):
    """f32_mm_rows (bf16_mm_rows' loops on float32 FMAs: the exact mode's tied LM head) against the
    float64 product on random inputs, one and two threads, dense and strided input rows."""
    gen = torch.Generator().manual_seed(rows * 100_000 + out_features * 10 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    wide = torch.randn(rows, in_features + 3, generator=gen)
    for x in (wide[:, 3:].contiguous(), wide[:, 3:]):
        for threads in (1, 2):
            assert_float32_product(mm_rows_at(threads, x, weight), x, weight)


@needs_bf16_rows
@pytest.mark.parametrize("streaming", [True, False])
def test_the_avx512_float32_matmul_at_one_row_is_the_exact_product_on_both_loops(streaming):
    """One row (the float32 head at batch 1) on each loop set_bf16_mm_rows_streaming picks, on the
    default model's head shape and an odd one."""
    gen = torch.Generator().manual_seed(11)
    ops = linear.avx512_bf16_ops()
    ops.set_bf16_mm_rows_streaming(streaming)
    try:
        for out_features, in_features in ((49152, 576), (1000, 95)):
            weight = torch.randn(out_features, in_features, generator=gen)
            x = torch.randn(1, in_features, generator=gen)
            for threads in (1, 2):
                assert_float32_product(mm_rows_at(threads, x, weight), x, weight)
    finally:
        ops.set_bf16_mm_rows_streaming(None)


@needs_bf16_rows
def test_the_avx512_float32_matmul_refuses_what_it_cannot_read():
    ops = linear.avx512_bf16_ops()
    weight = torch.randn(64, 96)
    with pytest.raises(RuntimeError, match="columns"):
        ops.f32_mm_rows(torch.randn(2, 94), weight)
    with pytest.raises(RuntimeError, match="x must be a .* float32 matrix"):
        ops.f32_mm_rows(torch.randn(2, 96).to(torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.f32_mm_rows(torch.randn(2, 64), weight.T)
    with pytest.raises(RuntimeError, match="weight must be a .* float32 matrix"):
        ops.f32_mm_rows(torch.randn(2, 96), weight.double())


def check_strips_product(matmul, threads: int, rows: int, out_features: int, in_features: int) -> None:
    """matmul(x, amx_linear_pack(W), bias, N) against the float32 product x W^T (+ bias) on random
    inputs, with bias and without, an input whose rows are not contiguous (row stride 2 K), on
    `threads` threads. Accumulation is float32; tolerance: bfloat16's rounding of the result (2^-8
    relative) plus float32 reassociation, atol 1e-2 * sqrt(K), rtol 1e-2."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 2 * in_features, generator=gen).to(torch.bfloat16)[:, in_features:]
    packed = strips_ops().amx_linear_pack(weight)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = matmul(x, packed, bias, out_features)
        no_bias = matmul(x.contiguous(), packed, None, out_features)
    finally:
        torch.set_num_threads(previous)
    expected = x.float() @ weight.float().T
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    tolerance = dict(atol=1e-2 * in_features**0.5, rtol=1e-2)
    torch.testing.assert_close(out.float(), expected + bias.float(), **tolerance)
    torch.testing.assert_close(no_bias.float(), expected, **tolerance)


needs_amx_linear = pytest.mark.skipif(amx_linear_ops() is None, reason="no AMX tiles on this machine")


@needs_amx_linear
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 257])
@pytest.mark.parametrize("out_features, in_features", [(50, 64), (1000, 576), (100, 1536)])
def test_the_amx_linear_equals_the_float_product(threads, rows, out_features, in_features):
    """amx_linear against the float32 product plus bias on random inputs: output widths not a
    multiple of its 16-column tiles (one thread's share odd with two threads), row counts below,
    at and past one A tile (the last 1-15 rows padded), across several input panels (257 rows at
    K 576) and weight chunks (1000 columns), an input whose rows are not contiguous. Accumulation
    is float32; the error is bfloat16's rounding of the result."""
    check_strips_product(amx_linear_ops().amx_linear, threads, rows, out_features, in_features)


needs_bf16_linear = pytest.mark.skipif(avx512_bf16_ops() is None, reason="no AVX512-BF16 on this machine")


@needs_bf16_linear
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 16, 17, 64, 100, 257, 1000])
@pytest.mark.parametrize("out_features, in_features", [(16, 32), (150, 576), (960, 1536)])
def test_the_avx512_bf16_linear_equals_the_float_product(threads, rows, out_features, in_features):
    """bf16_linear (kernels/csrc/bf16_linear.cpp), called directly so it also runs on AMX CPUs,
    against the float32 product of the same bfloat16 weights plus bias on random inputs: one
    strip, widths not a multiple of 16 (150: the last strip 6 columns, one thread's share odd with
    two threads), row counts below, at and past its 8-row register block, an input whose rows
    are not contiguous. Accumulation is float32; tolerance: bfloat16's rounding of the result
    (2^-8 relative) plus float32 reassociation, atol 1e-2 * sqrt(K), rtol 1e-2."""
    check_strips_product(avx512_bf16_ops().bf16_linear, threads, rows, out_features, in_features)


@needs_bf16_linear
@pytest.mark.parametrize("threads", [1, 2])
# 1-2 rows: 8 strips at once, 3-6: 4, no prefetch; 7-8: 3 strips, prefetch; 9 and 12: an 8-row
# block, then 1 and 4 rows (from L2)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12])
# K of one 32-column step and of the default model's widest (1536); 150, 1000, 129: a last strip of
# 6, 8 and 1 columns, a last group of fewer strips (10, 63 and 9 strips; two threads split them)
@pytest.mark.parametrize("out_features, in_features", [(150, 32), (1000, 576), (129, 1536), (7, 64)])
@pytest.mark.parametrize("streaming", [True, False])  # False: up to 6 rows on the prefetching loop (A/B switch)
def test_the_avx512_bf16_linear_at_few_rows_is_the_exact_product_rounded_once(threads, rows, out_features, in_features,
                                                                              streaming):
    """bf16_linear's few-row loops against the exact product plus bias under the stated rule: the
    products of bfloat16 values exact in float32, the K sums (and the bias) in float32 in any order,
    one bfloat16 rounding at the end (assert_bfloat16_product, with the bias as one more input
    column of ones against a weight column of the bias: the same exact value, K + 1 terms)."""
    gen = torch.Generator().manual_seed(rows * 10_000 + out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 2 * in_features, generator=gen).to(torch.bfloat16)[:, in_features:]  # rows not contiguous
    ops = avx512_bf16_ops()
    packed = ops.amx_linear_pack(weight)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ops.set_bf16_linear_streaming(streaming)
    try:
        out, no_bias = ops.bf16_linear(x, packed, bias, out_features), ops.bf16_linear(x, packed, None, out_features)
    finally:
        ops.set_bf16_linear_streaming(None)  # the CPU's rule again
        torch.set_num_threads(previous)
    assert_bfloat16_product(no_bias, x, weight)
    ones = torch.ones(rows, 1, dtype=torch.bfloat16)
    assert_bfloat16_product(out, torch.cat([x, ones], dim=1), torch.cat([weight, bias[:, None]], dim=1))


@needs_bf16_linear
def test_the_avx512_bf16_linear_refuses_what_it_cannot_read():
    ops = avx512_bf16_ops()
    packed = ops.amx_linear_pack(torch.randn(64, 96).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="columns"):
        ops.bf16_linear(torch.randn(2, 64).to(torch.bfloat16), packed, None, 64)
    with pytest.raises(RuntimeError, match="bfloat16 matrix"):
        ops.bf16_linear(torch.randn(2, 96), packed, None, 64)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.bf16_linear(torch.randn(2, 96).to(torch.bfloat16), packed, None, 80)
    with pytest.raises(RuntimeError, match="bias"):
        ops.bf16_linear(torch.randn(2, 96).to(torch.bfloat16), packed, torch.randn(63).to(torch.bfloat16), 64)
    with pytest.raises(RuntimeError, match="layout"):
        ops.bf16_linear(torch.randn(2, 96).to(torch.bfloat16), packed.view(4, 3, 32, 16), None, 64)


needs_strips = pytest.mark.skipif(strips_ops() is None, reason="no AMX-BF16 or AVX512-BF16 on this machine")


@needs_strips
@pytest.mark.parametrize("out_features, in_features", [(1000, 576), (1, 32), (15, 64), (17, 96), (200, 1536)])
def test_the_amx_linear_layout_holds_the_weight_exactly_once(out_features, in_features):
    """The packed weight is the only copy: the plain one comes back from it bit for bit (the
    unpack transposes whole 16 x 16 tiles in registers: also a last strip of 1-15 columns, K of
    one and of many tiles), and it is no larger than the weight with its columns padded to 16."""
    ops = strips_ops()
    weight = torch.randn(out_features, in_features).to(torch.bfloat16)
    packed = ops.amx_linear_pack(weight)
    assert packed.numel() == -(-out_features // 16) * 16 * in_features
    assert torch.equal(ops.amx_linear_unpack(packed, out_features), weight)


@needs_amx_linear
def test_the_amx_linear_refuses_what_it_cannot_read():
    ops = amx_linear_ops()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.amx_linear_pack(torch.randn(64, 48).to(torch.bfloat16))
    packed = ops.amx_linear_pack(torch.randn(64, 96).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="columns"):
        ops.amx_linear(torch.randn(2, 64).to(torch.bfloat16), packed, None, 64)
    with pytest.raises(RuntimeError, match="bfloat16 matrix"):
        ops.amx_linear(torch.randn(2, 96), packed, None, 64)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.amx_linear(torch.randn(2, 96).to(torch.bfloat16), packed, None, 80)
    with pytest.raises(RuntimeError, match="bias"):
        ops.amx_linear(torch.randn(2, 96).to(torch.bfloat16), packed, torch.randn(63).to(torch.bfloat16), 64)


def strips_layer(out_features: int, in_features: int, bias: bool, gen: torch.Generator) -> tuple[Linear, torch.Tensor]:
    layer = Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen))
    weight = layer.weight.detach().clone()
    assert layer.finalize(None, 32, pack=True) == "strips"
    return layer, weight


@needs_strips
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64, linear.AMX_STRIPS_MAX_ROWS, linear.AMX_STRIPS_MAX_ROWS + 1,
                                  linear.AMX_STRIPS_MAX_ROWS + 233])
def test_a_bfloat16_projection_on_strips_equals_f_linear_on_both_sides_of_the_crossover(rows, bias, monkeypatch):
    """A bfloat16 Linear on an AMX or AVX512-BF16 CPU keeps only the strips; up to the row limit
    they multiply in place, past it (prefill chunks) through a plain weight unpacked for the call:
    both equal F.linear on the original weight (float32 accumulation, bfloat16 rounding of the
    result), also for input rows that are not contiguous. Without AMX the limit is set to AMX's
    here, so both sides of it run on either kind of CPU."""
    monkeypatch.setattr(linear, "BF16_STRIPS_MAX_ROWS", linear.AMX_STRIPS_MAX_ROWS)
    gen = torch.Generator().manual_seed(rows)
    layer, weight = strips_layer(200, 96, bias, gen)
    assert layer.weight is None and layer.strips and layer.packed_weight.dim() == 4
    assert torch.equal(strips_ops().amx_linear_unpack(layer.packed_weight, 200), weight)
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    expected = F.linear(x.float(), weight.float(), None if layer.bias is None else layer.bias.float())
    with torch.inference_mode():
        out = layer(x)
        strided = layer(torch.cat([x, x], dim=1)[:, 96:])
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 200)
    for result in (out, strided):
        torch.testing.assert_close(result.float(), expected, atol=1e-2 * 96**0.5, rtol=1e-2)


@needs_strips
def test_only_widths_the_strips_can_read_take_them():
    """In bfloat16, K not a multiple of 32 stays on oneDNN's packed layout; float32's strips take
    any K (one line per k)."""
    odd = Linear(80, 64).to(torch.bfloat16)
    assert odd.finalize(None, 32, pack=True) == "packed" and not odd.strips
    odd_float = Linear(80, 64)
    assert odd_float.finalize(None, 32, pack=True) == "strips" and odd_float.strips


needs_f32_strips = pytest.mark.skipif(f32_strips_ops() is None, reason="no AVX-512 or no C++ kernels here")


@needs_f32_strips
@pytest.mark.parametrize("out_features, in_features", [(1, 1), (15, 64), (17, 75), (200, 1536)])
def test_the_float32_strips_hold_the_weight_exactly_once(out_features, in_features):
    """f32_strips_pack: [ceil(N/16), K, 16], columns past N zero; the weight comes back bit for bit."""
    weight = torch.randn(out_features, in_features)
    strips = linear.f32_strips_pack(weight)
    assert strips.shape == (-(-out_features // 16), in_features, 16)
    assert torch.equal(strips[0, :, 0], weight[0]) and torch.equal(strips[-1, :, (out_features - 1) % 16], weight[-1])
    assert not strips[-1, :, (out_features - 1) % 16 + 1:].any()
    unpacked = strips.transpose(1, 2).reshape(-1, in_features)[:out_features]  # strip s, column j: row 16 s + j
    assert torch.equal(unpacked, weight)


@needs_f32_strips
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7, 8, 9, 17, 64, 300])
def test_a_float32_projection_on_strips_equals_float64_and_does_not_depend_on_its_batch(rows, bias):
    """A float32 Linear keeps only f32_linear's strips and gives the float64 product to float32's
    rounding over K (one FMA per product, in order), at every row count (1-6: the streaming
    loop; more: row blocks of up to 8 over L2 chunks, 1-8 strips a block), for contiguous and
    strided rows, N and K not multiples of 16; and each row's output is bit for bit the one it
    gets alone: a request's greedy tokens do not depend on what it is batched with."""
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(75, 200, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 75, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(200, generator=gen))
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    assert layer.finalize(None, 32, pack=True) == "strips"
    assert layer.weight is None and layer.strips and layer.packed_weight.dtype == torch.float32
    x = torch.randn(rows, 75, generator=gen)
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    with torch.inference_mode():
        out = layer(x)
        strided = layer(torch.cat([x, x], dim=1)[:, 75:])
        alone = [layer(x[r:r + 1]) for r in range(0, rows, max(1, rows // 5))]
    assert out.dtype == torch.float32 and out.shape == (rows, 200)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(strided, out)
    for i, r in enumerate(range(0, rows, max(1, rows // 5))):
        assert torch.equal(alone[i][0], out[r])


@needs_f32_strips
def test_f32_linear_refuses_what_it_cannot_read():
    ops = f32_strips_ops()
    strips = linear.f32_strips_pack(torch.randn(64, 96))
    with pytest.raises(RuntimeError, match="columns"):
        ops.f32_linear(torch.randn(2, 64), strips, None, 64)
    with pytest.raises(RuntimeError, match="float32 matrix"):
        ops.f32_linear(torch.randn(2, 96).to(torch.bfloat16), strips, None, 64)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.f32_linear(torch.randn(2, 96), strips, None, 80)
    with pytest.raises(RuntimeError, match="bias"):
        ops.f32_linear(torch.randn(2, 96), strips, torch.randn(63), 64)
    with pytest.raises(RuntimeError, match="layout"):
        ops.f32_linear(torch.randn(2, 96), strips.view(4, 96, 4, 4), None, 64)


@needs_strips
@pytest.mark.parametrize("max_rows", [16, 1 << 30])
def test_the_bfloat16_engine_keeps_its_projections_only_as_strips(tiny_path, monkeypatch, max_rows):
    """Every projection but the tied LM head (the embedding's own tensor) is column strips (AMX's
    or AVX512-BF16's kernel), nothing float of them stays resident, and greedy tokens equal the
    same engine's on oneDNN's layout (a CPU with neither) with the prompt's prefill past the
    crossover (through the unpacked weight: the crossover lowered to 16 rows so a tiny model's
    prompt crosses it) or, with no crossover, in place, and the decodes in place."""
    from engine import SamplingParams

    if max_rows > 16 and amx_linear_ops() is not None:
        pytest.skip("on AMX this check keeps its crossover at 16 rows, as before (the case without one is bf16_linear's)")
    monkeypatch.setattr(linear, "AMX_STRIPS_MAX_ROWS", 16)
    monkeypatch.setattr(linear, "BF16_STRIPS_MAX_ROWS", max_rows)
    prompt = list(range(3, 3 + 40))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(tiny_path), num_kv_blocks=32, dtype="bfloat16", quantization="none")
    model = llm.engine.runner.model_runner.model
    projections = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
    assert projections and all(m.strips and m.weight is None for m in projections)
    tokens = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    del llm, model, projections

    monkeypatch.setattr(linear, "strips_ops", lambda: None)  # the layout a CPU with neither gets (finalize asks it)
    reference = LLM(str(tiny_path), num_kv_blocks=32, dtype="bfloat16", quantization="none")
    assert not any(m.strips for m in reference.engine.runner.model_runner.model.modules() if isinstance(m, Linear))
    assert reference.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == tokens
