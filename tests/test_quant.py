"""Weight-only quantization: int8 and int4 projections against a float reference on random
inputs, GGUF blocks read into the same codes exactly as gguf's own dequantization reads them,
and one resident copy of every weight."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.gguf_weights import quantized_weight, unpermute_rows
from engine.layers.embedding import ParallelLMHead
from engine.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from engine.layers.linear_kernels import can_pack_for_cpu, f32_strips_ops
from engine.layers.packed_weight import PackedQuantizedWeight
from engine.layers.quant import QuantizedWeight, quantize, quantize_int4, quantize_int8
from engine.layers.quant_kernels import (AMX_MIN_ROWS, amx_kernels, DENSE_MIN_ROWS, INT4_ROWS_MAX_ROWS, INT8_AMX_MIN_ROWS, int4_f32_kernels,
                                         int4_f32_strips, int4_kernels_beat_bfloat16, w8a8_kernels)
from engine.layers.rotation import hadamard_block, rotate
from tests.helpers import outputs_by_threads_and_rows

gguf = pytest.importorskip("gguf")
PACK = can_pack_for_cpu(torch.device("cpu"), torch.float32)


def quantized_layer(method, group, weight, bias=None, dtype=torch.float32) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    assert layer.finalize(method, group, PACK) == method
    return layer


@pytest.mark.parametrize("method,group", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 257])
def test_quantized_matmul_equals_its_dequantized_weight_in_float32(method, group, rows):
    gen = torch.Generator().manual_seed(rows * 7 + group)
    weight, bias = torch.randn(100, 256, generator=gen), torch.randn(100, generator=gen)  # 100 rows: not a multiple of 16
    q = quantize_int8(weight) if method == "int8" else quantize_int4(weight, group)
    layer = quantized_layer(method, group, weight, bias)
    x = torch.randn(3 * rows, 256, generator=gen)[::3]  # strided rows, as the LM head's gathered input
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, q.dequantize(), bias), atol=1e-4, rtol=1e-4)
    # And the quantization error itself: int8 within 1%, int4 within 12% of the output's norm.
    error = (out - F.linear(x, weight, bias)).norm() / F.linear(x, weight, bias).norm()
    assert error < (0.01 if method == "int8" else 0.12), error


def test_int4_on_float32_rows_without_our_kernels_warns_once_that_bfloat16_rows_run_it_faster(caplog, monkeypatch):
    """Where int4_f32_linear runs (AVX-512), a float32 int4 layer is its int4 strips, no warning;
    elsewhere (simulated: no AVX-512 kernels) PyTorch's int4 op on float32 rows, with the warning."""
    from engine.layers import packed_weight as quant

    quant._warn_int4_on_float32_rows.cache_clear()
    weight = torch.randn(32, 64)
    with caplog.at_level("WARNING", logger="engine.layers.packed_weight"):
        quantized_layer("int4", 32, weight.bfloat16(), dtype=torch.bfloat16)
        quantized_layer("int8", 32, weight)  # int8's float32 rows take F.linear on its codes
        assert quantized_layer("int4", 32, weight).quantized.f32_strips == (int4_f32_kernels() is not None)
        assert not caplog.records
        monkeypatch.setattr(quant, "int4_f32_kernels", lambda: None)
        assert not quantized_layer("int4", 32, weight).quantized.f32_strips
        quantized_layer("int4", 32, weight)
    (record,) = caplog.records
    assert "dtype=float32" in record.message and "dtype='bfloat16'" in record.message


@pytest.mark.skipif(int4_f32_kernels() is None, reason="int4_f32_linear needs a CPU with AVX-512")
@pytest.mark.parametrize("method,group", [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32)])
def test_int4_and_int8_in_a_float32_layer_are_their_dequantized_weight_and_a_rows_output_does_not_depend_on_its_batch(
        method, group):
    """int4_f32_linear / int8_f32_linear (strips; int4 factored per group as the sum of x * code
    times the scale plus the group's sum of x times the offset, int8's weight made as code * scale;
    sums over k in order): within float32 rounding of the float32 product with the dequantized
    weight; and each row's output the same bits at every row count, in registers (up to 8 rows) or
    through the strips converted per call (9 on), on one thread or two. 200 outputs: a last strip
    of 8 columns; 640 inputs: 20, 10 or 5 groups."""
    gen = torch.Generator().manual_seed(group)
    weight = torch.randn(200, 640, generator=gen)
    q = quantize_int4(weight, group) if method == "int4" else quantize_int8(weight)
    layer = quantized_layer(method, group, weight)
    codes = layer.quantized.qweight
    assert layer.quantized.f32_strips and codes.dtype == (torch.uint8 if method == "int4" else torch.int8)
    assert codes.numel() == 13 * 16 * 640 // (2 if method == "int4" else 1)  # int4: a byte per two weights; 13 strips
    if method == "int8":  # the rows a tied table gathers from the strips
        assert torch.equal(layer.quantized.int8_rows(), q.codes)
        index = torch.tensor([[3, 199], [17, 0]])
        assert torch.equal(layer.quantized.int8_rows(index), q.codes[index])
    x = torch.randn(40, 640, generator=gen)
    expected = F.linear(x, q.dequantize())
    outs = outputs_by_threads_and_rows(layer, x, (1, 2, 5, 8, 9, 16, 40))
    assert ((outs[2, 40] - expected).norm() / expected.norm()) < 1e-6
    for (threads, rows), out in outs.items():
        assert torch.equal(out, outs[1, 40][:rows]), (threads, rows)


@pytest.mark.skipif(int4_f32_kernels() is None, reason="int4_f32_linear needs a CPU with AVX-512")
@pytest.mark.parametrize("group", [2, 40])
def test_int4_f32_linear_takes_any_even_group_dividing_the_inputs(group):
    """The op itself (the engine's groups are 32-256): groups of 2 and of 40 (group sums over a part
    of a vector) at 1 and 12 rows, within float32 rounding of the dequantized weight."""
    gen = torch.Generator().manual_seed(group)
    q = quantize_int4(torch.randn(40, 160, generator=gen), group)
    codes, scales = int4_f32_strips(q.codes, q.scale, q.zero)
    x = torch.randn(12, 160, generator=gen)
    expected = F.linear(x, q.dequantize())
    for rows in (1, 12):
        out = int4_f32_kernels().int4_f32_linear(x[:rows], codes, scales, 40)
        assert ((out - expected[:rows]).norm() / expected[:rows].norm()) < 1e-6, rows


@pytest.mark.skipif(int4_f32_kernels() is None, reason="int4_f32_linear needs a CPU with AVX-512")
def test_int4_f32_strips_keep_scales_in_float16_where_they_are_exactly_float16():
    """A GGUF's Q4_0/Q4_1 scales and offsets are float16: the strips keep them so (a sixth fewer
    bytes), and the products are the same bits as with them in float32; one that is not float16
    stays float32."""
    gen = torch.Generator().manual_seed(3)
    q = quantize_int4(torch.randn(40, 160, generator=gen), 32)
    scale = q.scale.half().float()
    offset = (q.zero - 8 * q.scale).half().float()
    codes, scales = int4_f32_strips(q.codes, scale, offset + 8 * scale)
    assert scales.dtype == torch.float16
    x = torch.randn(12, 160, generator=gen)
    ops = int4_f32_kernels()
    for rows in (1, 5, 12):  # in registers and converted per call
        assert torch.equal(ops.int4_f32_linear(x[:rows], codes, scales, 40), ops.int4_f32_linear(x[:rows], codes, scales.float(), 40))
    _, exact = int4_f32_strips(q.codes, q.scale, q.zero)
    assert exact.dtype == torch.float32


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_matmul_in_bfloat16(method):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=gen).bfloat16()
    q = quantize_int8(weight) if method == "int8" else quantize_int4(weight, 32)
    layer = quantized_layer(method, 32, weight, dtype=torch.bfloat16)
    x = torch.randn(16, 128, generator=gen).bfloat16()
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # Scales and zeros are rounded to bfloat16 too: within 2% of the output's norm.
    expected = F.linear(x.float(), q.dequantize())
    assert (out.float() - expected).norm() / expected.norm() < 0.02


needs_amx = pytest.mark.skipif(amx_kernels() is None, reason="the AMX quantized matmuls need AMX-BF16 and PyTorch's AVX-512 kernels")
needs_amx_int8 = pytest.mark.skipif(amx_kernels() is None or not amx_kernels().amx_int8_supported(),
                                    reason="int8's kernels need AMX-INT8 and AVX512-VNNI")


def _amx_reference(layer: Linear, q: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """float32 x @ the layer's weight as it holds it: scales (and zeros) rounded to bfloat16,
    each int4 value rounded to bfloat16 as the kernel's tile holds it; int8 scales applied after."""
    expand = lambda t: t.bfloat16().float().repeat_interleave(q.group_size, dim=1)  # noqa: E731
    if q.bits == 8:
        return (x.float() @ q.codes.float().t()) * q.scale.reshape(1, -1).bfloat16().float()
    weight = ((q.codes.float() - 8) * expand(q.scale) + expand(q.zero)).bfloat16().float()
    return x.float() @ weight.t()


@needs_amx
@pytest.mark.parametrize("method,group", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 64, 257])
def test_amx_quantized_matmul_equals_its_dequantized_weight(method, group, rows):
    """The kernels themselves at every row count (the layer sends each row count to one of them),
    on shapes that are not multiples of their tiles: 100 outputs (a partial 64-column block);
    384 inputs (int8: 106, not a multiple of the tile's 32 either); the input's rows strided (a
    gathered LM head input). The AMX tile loop and each few-row loop (int8_mm_rows, int4_mm_rows)."""
    gen = torch.Generator().manual_seed(rows + group)
    cols = 106 if method == "int8" else 384
    weight = torch.randn(100, cols, generator=gen).bfloat16()  # what the layer quantizes
    q = quantize_int8(weight) if method == "int8" else quantize_int4(weight, group)
    packed = quantized_layer(method, group, weight, dtype=torch.bfloat16).quantized
    assert packed.amx
    x = torch.randn(2 * rows, cols, generator=gen).bfloat16()[::2]
    ops = amx_kernels()
    with torch.inference_mode():
        if method == "int8":
            outs = [ops.int8_mm_amx(x, packed.qweight, packed.scales, 100), ops.int8_mm_rows(x, packed.qweight, packed.scales, 100)]
        else:
            outs = [ops.int4_mm_amx(x, packed.qweight, packed.scales, group, 100),
                    ops.int4_mm_rows(x, packed.qweight, packed.scales, group, 100)]
    expected = _amx_reference(packed, q, x)
    for out in outs:
        assert out.shape == (rows, 100) and out.dtype == torch.bfloat16
        # What is left is the float32 sum's order and the output's rounding to bfloat16 (2^-9).
        assert (out.float() - expected).norm() / expected.norm() < 3e-3


@needs_amx_int8
@pytest.mark.parametrize("rows", [3, 16, 64])
def test_int8_input_rounding_stays_within_its_bound_even_beside_an_outlier(rows):
    """Both int8 kernels (AMX-INT8's tile loop, the few-row VNNI loop) multiply each input row as
    16-bit fixed point (one scale, max |x| / 32767): every element within max |x| / 65534, so
    each output within that times the column's sum of |weight|, plus the output's rounding to
    bfloat16 (2^-9 of it). Half the rows carry one element 10^4 times the rest (its small
    elements then keep few bits: the bound still holds)."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(100, 576, generator=gen).bfloat16()
    q = quantize_int8(weight)
    packed = quantized_layer("int8", 32, weight, dtype=torch.bfloat16).quantized
    x = torch.randn(rows, 576, generator=gen)
    x[::2, 7] = 1e4 * x[::2, 7].sign()
    x = x.bfloat16()
    w = q.codes.double() * q.scale.reshape(-1, 1).bfloat16().double()  # the weight the kernels multiply
    exact = x.double() @ w.t()
    bound = (x.double().abs().amax(1, keepdim=True) / 65534) @ w.abs().sum(1, keepdim=True).t()
    for op in (amx_kernels().int8_mm_amx, amx_kernels().int8_mm_rows):
        with torch.inference_mode():
            out = op(x, packed.qweight, packed.scales, 100).double()
        error = (out - exact).abs()
        assert (error <= 1.01 * bound + exact.abs() * 2**-8).all(), (op, (error - bound).max())
        # The outlier rows do lose bits: their error is of the bound's order, not bfloat16's.
        assert (error[::2] > 0.1 * bound[::2]).any(), op


@needs_amx_int8
@pytest.mark.parametrize("rows", [2, 16])
def test_int8_kernels_pass_a_nan_input_on_and_round_a_vanishing_row_to_zero(rows):
    """A row holding a NaN gives NaN outputs (as a bfloat16 weight's product does; its 16-bit
    split must not clamp the NaN into finite codes), and a row whose values are so small that
    1 / its scale would overflow (max |x| 1e-36) gives outputs of about zero, not garbage; the
    other rows are untouched."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(100, 576, generator=gen).bfloat16()
    packed = quantized_layer("int8", 32, weight, dtype=torch.bfloat16).quantized
    x = torch.randn(rows, 576, generator=gen)
    x[0, 5] = float("nan")
    x[1] = x[1] * 1e-36
    x = x.bfloat16()
    reference = amx_kernels().int8_mm_rows(x[1:].clone() * 0, packed.qweight, packed.scales, 100)
    for op in (amx_kernels().int8_mm_amx, amx_kernels().int8_mm_rows):
        with torch.inference_mode():
            out = op(x, packed.qweight, packed.scales, 100).float()
        assert out[0].isnan().all(), op
        assert out[1].abs().max() < 1e-30, (op, out[1].abs().max())
        if rows > 2:
            alone = op(x[2:].contiguous(), packed.qweight, packed.scales, 100).float()
            assert torch.equal(out[2:], alone), op
    assert reference.abs().max() == 0


@needs_amx_int8
def test_int8_kernels_refuse_inputs_wider_than_their_int32_sums_hold():
    """255 * 128 * K < 2^31 holds to K = 65536: a wider weight is refused by name, not wrapped."""
    x = torch.ones(16, 65600, dtype=torch.bfloat16)
    codes = torch.ones(1, 65600 // 4, 64, 4, dtype=torch.int8)
    scales = torch.ones(64, dtype=torch.bfloat16)
    for op in (amx_kernels().int8_mm_amx, amx_kernels().int8_mm_rows):
        with pytest.raises(RuntimeError, match="at most 65536 inputs"):
            op(x, codes, scales, 64)


@needs_amx
@pytest.mark.parametrize("method,group", [("int8", 32), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("outputs", [150, 520])
def test_two_threads_split_a_block_of_the_amx_loop_by_its_halves(method, group, outputs):
    """Two threads share the tile loop's 32-column halves: with an odd number of 64-column blocks
    (150 outputs: 3, the last partial; 520: 9, as the default model's o and down projections) one
    thread converts and multiplies only the first half of the middle block, the other its second
    half. Every row count the loop takes (from AMX_MIN_ROWS to its 256-row chunk, and the whole
    blocks beyond), odd input widths (int8: 106), against the float reference and one thread."""
    gen = torch.Generator().manual_seed(outputs + group)
    cols = 106 if method == "int8" else 384
    weight = torch.randn(outputs, cols, generator=gen).bfloat16()
    q = quantize_int8(weight) if method == "int8" else quantize_int4(weight, group)
    packed = quantized_layer(method, group, weight, dtype=torch.bfloat16).quantized
    ops = amx_kernels()

    def run(x):
        if method == "int8":
            return ops.int8_mm_amx(x, packed.qweight, packed.scales, outputs)
        return ops.int4_mm_amx(x, packed.qweight, packed.scales, group, outputs)

    threads = torch.get_num_threads()
    try:
        for rows in (AMX_MIN_ROWS, 16, 17, 64, 257):
            x = torch.randn(rows, cols, generator=gen).bfloat16()
            with torch.inference_mode():
                torch.set_num_threads(1)
                alone = run(x)
                torch.set_num_threads(2)
                shared = run(x)
            expected = _amx_reference(packed, q, x)
            assert (shared.float() - expected).norm() / expected.norm() < 3e-3, rows
            assert torch.equal(shared, alone), rows  # each column's sums in the same order either way
    finally:
        torch.set_num_threads(threads)


@needs_amx
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 2])
def test_few_row_loops_carry_each_groups_input_sum_for_inputs_far_from_zero_mean(group, rows):
    """int4_mm_rows multiplies codes as 128 + code and takes the bias back out through each row's
    sum over each group (computed inside the kernel); inputs centred on 3, not 0, make those sums
    large, so a wrong sum shows. 640 outputs: ten 64-column blocks streamed back to back (the
    few-row loops prefetch a fixed distance ahead, across block ends). int8_mm_rows alike."""
    gen = torch.Generator().manual_seed(rows * 10 + group)
    weight = torch.randn(640, 512, generator=gen).bfloat16()
    x = (torch.randn(2 * rows, 512, generator=gen) + 3).bfloat16()[::2]
    ops = amx_kernels()
    for method in ("int4", "int8"):
        q = quantize_int8(weight) if method == "int8" else quantize_int4(weight, group)
        packed = quantized_layer(method, group, weight, dtype=torch.bfloat16).quantized
        with torch.inference_mode():
            if method == "int8":
                out = ops.int8_mm_rows(x, packed.qweight, packed.scales, 640)
            else:
                out = ops.int4_mm_rows(x, packed.qweight, packed.scales, group, 640)
        if method == "int8":
            expected = _amx_reference(packed, q, x)
        else:  # the loop's weight values are exact in float32 (not rounded to bfloat16 as the tile's)
            expand = lambda t: t.bfloat16().float().repeat_interleave(group, dim=1)  # noqa: E731
            expected = x.float() @ ((q.codes.float() - 8) * expand(q.scale) + expand(q.zero)).t()
        assert (out.float() - expected).norm() / expected.norm() < 3e-3, method


@needs_amx
def test_int8_weight_converts_whole_to_its_values_rounded_to_bfloat16():
    """int8's prefill-sized form: [K, N] (100 outputs, 106 inputs), code * scale in bfloat16, and
    the rows padding K to the kernel's 64-input step all zero."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(100, 106, generator=gen).bfloat16()
    q = quantize_int8(weight)
    packed = quantized_layer("int8", 32, weight, dtype=torch.bfloat16).quantized
    expected = (q.codes.float() * q.scale.reshape(-1, 1).bfloat16().float()).bfloat16()
    dense = amx_kernels().int8_dequantize(packed.qweight, packed.scales, 100)
    assert dense.shape == (128, 100) and torch.equal(dense[:106], expected.t()) and not dense[106:].any()


@needs_amx
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weight_converts_whole_to_exactly_its_bfloat16_values(group):
    """What prefill-sized inputs multiply with: the weight transposed, [K, N] (100 outputs: a
    partial 64-column block), each value the bfloat16 rounding of (code - 8) * scale + zero."""
    gen = torch.Generator().manual_seed(group)
    weight = torch.randn(100, 384, generator=gen).bfloat16()  # what the layer quantizes
    q = quantize_int4(weight, group)
    packed = quantized_layer("int4", group, weight, dtype=torch.bfloat16).quantized
    expand = lambda t: t.bfloat16().float().repeat_interleave(group, dim=1)  # noqa: E731
    expected = ((q.codes.float() - 8) * expand(q.scale) + expand(q.zero)).bfloat16()
    assert torch.equal(amx_kernels().int4_dequantize(packed.qweight, packed.scales, group, 100), expected.t())


@needs_amx
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_amx_quantized_matmul_at_prefill_sizes_keeps_every_block_and_row_chunk(method):
    """Beyond 256 rows a thread keeps a group of converted blocks while row chunks pass over them:
    on one thread, 45 blocks of 64 columns x 384 inputs do not fit one group (2 MB), and 300 rows
    are two chunks, the second a partial row tile."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(45 * 64, 384, generator=gen).bfloat16()
    q = quantize_int8(weight) if method == "int8" else quantize_int4(weight, 32)
    packed = quantized_layer(method, 32, weight, dtype=torch.bfloat16).quantized
    x = torch.randn(300, 384, generator=gen).bfloat16()
    ops, threads = amx_kernels(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            if method == "int8":
                out = ops.int8_mm_amx(x, packed.qweight, packed.scales, weight.shape[0])
            else:
                out = ops.int4_mm_amx(x, packed.qweight, packed.scales, 32, weight.shape[0])
    finally:
        torch.set_num_threads(threads)
    expected = _amx_reference(packed, q, x)
    assert ((out.float() - expected).norm(dim=0) / expected.norm(dim=0)).max() < 3e-3  # every column


@needs_amx
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_bfloat16_layer_takes_the_amx_kernel_from_its_row_threshold_on_two_threads(method):
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(200, 96, generator=gen)  # 4 column tiles, the last one partial: 2 threads split them
    layer = quantized_layer(method, 32, weight, dtype=torch.bfloat16)
    packed, ops = layer.quantized, amx_kernels()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            threshold = INT8_AMX_MIN_ROWS if method == "int8" else AMX_MIN_ROWS
            for rows in (1, INT4_ROWS_MAX_ROWS, INT4_ROWS_MAX_ROWS + 1, threshold - 1, threshold, 40):
                x = torch.randn(rows, 96, generator=gen).bfloat16()
                if method == "int8":  # few rows: its own loop over the same codes; PyTorch's op as a second opinion
                    amx = ops.int8_mm_amx(x, packed.qweight, packed.scales, 200)
                    few = ops.int8_mm_rows(x, packed.qweight, packed.scales, 200)
                    theirs = torch.ops.aten._weight_int8pack_mm(x, packed.int8_rows().contiguous(), packed.scales)
                else:  # 1-2 rows: its own loop; then PyTorch's op up to the AMX kernel
                    amx = ops.int4_mm_amx(x, packed.qweight, packed.scales, 32, 200)
                    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed.qweight, 32, packed.scales)[:, :200]
                    loop = ops.int4_mm_rows(x, packed.qweight, packed.scales, 32, 200)
                    few = loop if rows <= INT4_ROWS_MAX_ROWS else theirs
                assert torch.equal(layer(x), amx if rows >= threshold else few), rows
                # All compute the same product: within bfloat16 rounding of each other.
                for ours in (amx, few):
                    assert (ours.float() - theirs.float()).norm() / theirs.float().norm() < 1e-2
            # Prefill-sized: the weight converted whole, multiplied by oneDNN.
            x = torch.randn(DENSE_MIN_ROWS, 96, generator=gen).bfloat16()
            if method == "int8":
                dense = x @ ops.int8_dequantize(packed.qweight, packed.scales, 200)[:96]  # K padded to 128
                amx = ops.int8_mm_amx(x, packed.qweight, packed.scales, 200)
            else:
                dense = x @ ops.int4_dequantize(packed.qweight, packed.scales, 32, 200)
                amx = ops.int4_mm_amx(x, packed.qweight, packed.scales, 32, 200)
            assert torch.equal(layer(x), dense)
            assert (dense.float() - amx.float()).norm() / amx.float().norm() < 1e-2
    finally:
        torch.set_num_threads(threads)


needs_w8a8 = pytest.mark.skipif(w8a8_kernels() is None, reason="w8a8 needs AMX-INT8 or AVX512-VNNI")


def w8a8_vnni_takes(dtype: torch.dtype) -> None:
    """Skip unless w8a8_mm_vnni runs rows of `dtype` here: float32 on any AVX512-VNNI CPU, bfloat16
    where it has AVX512-BF16 too."""
    if dtype == torch.bfloat16 and not w8a8_kernels().avx512_vnni_supported():
        pytest.skip("w8a8_mm_vnni takes bfloat16 rows on CPUs with AVX512-BF16 only")


def test_the_w8a8_rotation_is_the_block_hadamard_matrix_and_its_own_inverse():
    """rotate(t, B) = t R, R block-diagonal with the normalized Sylvester Hadamard matrix of B
    columns per block (built here by Kronecker products, not by the transform under test)."""
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(5, 192, generator=gen)
    h = torch.ones(1, 1)
    while h.shape[0] < 64:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    r = torch.block_diag(*[h / 8] * 3)
    torch.testing.assert_close(rotate(t, 64), t @ r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(rotate(t, 64), 64), t, atol=1e-5, rtol=1e-5)


def test_the_w8a8_rotation_block_is_the_widths_largest_power_of_two_factor(caplog):
    assert hadamard_block(576) == 64 and hadamard_block(1536) == 512 and hadamard_block(2048) == 2048
    hadamard_block.cache_clear()  # logged once per width: on its first call
    with caplog.at_level("INFO", logger="engine.layers.rotation"):
        assert hadamard_block(388) == 0  # 4 x 97: no block of 32+ columns, quantized unrotated
    assert "input width 388" in caplog.text and "unrotated" in caplog.text


def test_a_rotated_weight_dequantizes_to_the_weight_and_is_not_split_by_columns():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(40, 576, generator=gen)
    q = quantize(weight, "w8a8", 32)
    assert q.rotation == 64 and q.bits == 8 and q.rows(8, 4).rotation == 64
    assert (q.dequantize() - weight).norm() / weight.norm() < 0.01  # int8 rounding of W R, rotated back
    assert quantize(q, "w8a8", 32) is q  # already in w8a8's codes
    assert quantize(q, "int8", 32).rotation == 0  # int8 weight-only multiplies unrotated codes
    with pytest.raises(ValueError, match="rotated weight"):
        q[:, :64]


@needs_w8a8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_w8a8_kernel_refuses_a_rotation_block_that_does_not_tile_the_input(dtype):
    w8a8_vnni_takes(dtype)
    q = quantize(torch.randn(64, 96), "w8a8", 32)
    packed = PackedQuantizedWeight(q, dtype, torch.device("cpu"), int8_activations=True)
    assert packed.rotation == 32
    ops = w8a8_kernels()
    for matmul in [ops.w8a8_mm_vnni] if not packed.amx else [ops.w8a8_mm_amx, ops.w8a8_mm_vnni]:
        with pytest.raises(RuntimeError, match="rotation_block"):
            matmul(torch.randn(2, 96).to(packed.rows_dtype), packed.qweight, packed.scales, 64, 64)


def w8a8_reference(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """What w8a8 computes, in float32: the input rotated as the weight was, each row rounded to
    int8 with scale max |x| / 127, times the weight's codes and scales."""
    x = rotate(x.float(), q.rotation) if q.rotation else x.float()
    x_scale = x.abs().amax(1, keepdim=True) / 127
    return (torch.round(x / x_scale) @ q.codes.float().t()) * x_scale * q.scale.reshape(1, -1)


@needs_w8a8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols,rotation", [(576, 64), (1536, 512), (388, 0)])
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 257])
def test_w8a8_matmul_equals_its_rotated_per_row_quantized_input_times_its_codes(rows, cols, rotation, dtype):
    """100 outputs (a partial 64-column tile); 576 and 1536 input columns (the default model's)
    rotated in blocks of 64 and 512, 388 (4 x 97: no block, and not a multiple of 16: the input's
    quantization runs a masked tail) unrotated. Every input row has an outlier channel, as a
    small model's do. Reference: w8a8_reference in float32; and the float product, which the
    rotation brings within twice int8 weight-only's distance (unrotated: 3-7x farther, measured).
    A float32 layer: its rows straight into w8a8_mm_vnni and float32 out (AMX: cast to bfloat16
    and back), within float32 rounding of the reference where no bfloat16 rounding is between."""
    gen = torch.Generator().manual_seed(rows + cols)
    weight = torch.randn(100, cols, generator=gen).bfloat16()
    layer = quantized_layer("w8a8", 32, weight, dtype=dtype)
    assert layer.quantized.rotation == rotation
    q = quantize(weight, "w8a8", 32)
    x = torch.randn(rows, cols, generator=gen)
    x[:, 5] *= 50
    x = x.to(dtype)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (rows, 100) and out.dtype == dtype
    assert layer.quantized.vector == (not layer.quantized.amx and layer.quantized.rows_dtype == dtype)
    expected = w8a8_reference(x, q)
    # bfloat16 rows or outputs: the sum's order and the bfloat16 rounding (measured 1.6-1.9e-3).
    # float32 rows and outputs: the sums exact in int32, so only float32 rounding (measured 5e-8 to
    # 1.2e-7), except where a rotated value sits on a rounding tie: the kernel's butterflies and
    # torch's rotate round it apart by an ulp, and its code may round the other way (one such code
    # ~7e-5 here; 1-2 of 257 x 576 and 257 x 1536 measured, none at 64 rows or unrotated).
    if torch.bfloat16 in (dtype, layer.quantized.rows_dtype):
        bound = 3e-3
    else:
        bound = 3e-4 if rotation else 1e-6
    assert (out.float() - expected).norm() / expected.norm() < bound
    full = x.float() @ weight.float().t()
    error = (out.float() - full).norm() / full.norm()
    weight_only = (x.float() @ quantize_int8(weight).dequantize().t() - full).norm() / full.norm()
    assert error < (2 * weight_only if rotation else 0.1), (error, weight_only)
    if rotation:  # the same product unrotated: the outlier coarsens every other channel's rounding
        plain = (w8a8_reference(x, quantize_int8(weight)) - full).norm() / full.norm()
        assert error < plain / 2, (error, plain)
    if layer.quantized.amx:  # AMX CPUs have AVX512-VNNI too: both kernels, the same sums and outputs
        packed = layer.quantized
        assert torch.equal(w8a8_kernels().w8a8_mm_vnni(x, packed.qweight, packed.scales, 100, rotation), out)


@needs_w8a8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,cols,outputs", [(1, 320, 200), (2, 320, 250), (3, 320, 200), (4, 320, 200), (5, 320, 200),
                                               (6, 320, 200), (7, 100, 220), (64, 320, 220), (300, 100, 200)], ids=str)
def test_w8a8_vnni_outputs_are_the_exact_integer_product_of_the_rounded_rows_and_codes(rows, cols, outputs, threads, dtype):
    """w8a8_mm_vnni unrotated, every step redone in torch: each row rounded to int8 (scale max |x| /
    127 in float32, round half to even), the int32 product with the weight's codes (exact here in
    int64; the kernel biases the row's bytes by 128 for VNNI's unsigned x signed products and
    subtracts 128 x each column's code sum), times column scale x row scale in float32, rounded to
    the rows' dtype (bfloat16, or float32 as it is): equal bit for bit, on one thread and on two
    (each its own units and their sums).
    Rows 1-2 take 64-column units (each a register block), 3-6 and more 32-column ones, 7 a block
    and a tail, 300 two chunks of 256; 100 inputs end in a masked part of 16; 200 outputs end in a
    unit of 8 columns, 220 in one of 28 (two vectors, the second masked), 250 (2 rows) in a 64-column
    unit of 58 (four vectors). A row of zeros comes out zero, a row holding a NaN all NaN."""
    w8a8_vnni_takes(dtype)
    gen = torch.Generator().manual_seed(rows + cols)
    weight = torch.randn(outputs, cols, generator=gen)
    q = quantize_int8(weight)
    packed = PackedQuantizedWeight(q, dtype, torch.device("cpu"), int8_activations=True)
    x = torch.randn(rows, cols, generator=gen) * 3
    x[:, 7] *= 40
    x = x.to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = w8a8_kernels().w8a8_mm_vnni(x, packed.qweight, packed.scales, outputs, 0)
        if rows > 2:
            special = x.clone()
            special[0], special[1, 3] = 0, float("nan")
            zero_and_nan = w8a8_kernels().w8a8_mm_vnni(special, packed.qweight, packed.scales, outputs, 0)
            assert (zero_and_nan[0] == 0).all() and zero_and_nan[1].isnan().all()
            assert torch.equal(zero_and_nan[2:], out[2:])
    finally:
        torch.set_num_threads(before)
    row_scale = x.float().abs().amax(1, keepdim=True) / 127
    codes = torch.round(x.float() * (1 / row_scale))
    assert codes.abs().max() == 127
    sums = (codes.long() @ q.codes.long().t()).int().float()
    expected = (sums * (packed.scales[:outputs].reshape(1, -1) * row_scale)).to(dtype)
    assert out.dtype == dtype and torch.equal(out.view(torch.int16), expected.view(torch.int16))
    if packed.amx and dtype == torch.bfloat16:
        assert torch.equal(w8a8_kernels().w8a8_mm_amx(x, packed.qweight, packed.scales, outputs, 0), out)


@needs_w8a8
def test_w8a8_refuses_at_load_a_projection_wider_than_its_int32_sums_hold():
    with pytest.raises(ValueError, match="at most 65536 inputs"):
        PackedQuantizedWeight(quantize_int8(torch.randn(64, 65540)), torch.bfloat16, torch.device("cpu"),
                              int8_activations=True)


@needs_w8a8
def test_w8a8_layers_hold_only_int8_codes_and_take_float32_inputs(tiny_path):
    llm = LLM(str(tiny_path), num_kv_blocks=16, quantization="w8a8", dtype="float32")
    modules = list(llm.engine.runner.model_runner.model.modules())
    layers = [m for m in modules if isinstance(m, Linear) and not isinstance(m, ParallelLMHead) and m.quantized is not None]
    assert layers and all(m.weight is None and m.quantized.w8a8 and m.quantized.qweight.dtype == torch.int8 for m in layers)
    assert all(m.quantized.rotation == hadamard_block(m.quantized.in_features) > 0 for m in layers)  # rotated
    # Without AMX the float32 rows go straight into w8a8_mm_vnni (one op: decoder_layer's), no casts.
    assert all(m.quantized.vector == (not m.quantized.amx) for m in layers)
    # The LM head too (embedding_quantization int8): rounding its rotated input to int8 measured
    # closer to float32 than int8 weight-only rows on the default model (test_default_model.py).
    (head,) = [m for m in modules if isinstance(m, ParallelLMHead)]
    assert head.quantized.w8a8 and head.quantized.rotation == hadamard_block(head.in_features) > 0
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.slow  # a fresh interpreter: about 10 s
def test_without_avx512_the_quantized_layers_keep_pytorchs_ops():
    """ATEN_CPU_CAPABILITY=avx2 (as on an AVX2-only CPU): no AMX kernels, int4 packed in 16-row
    multiples, int8 in PyTorch's [N, K] rows, and the layers still equal their dequantized weights."""
    script = textwrap.dedent(
        """
        import torch
        from engine.layers.quant import quantize_int4, quantize_int8
        from engine.layers.quant_kernels import amx_kernels
        from tests.test_quant import quantized_layer
        weight = torch.randn(100, 128).bfloat16()
        layer = quantized_layer("int4", 32, weight, dtype=torch.bfloat16)
        x = torch.randn(20, 128).bfloat16()
        expected = x.float() @ quantize_int4(weight, 32).dequantize().t()
        error = (layer(x).float() - expected).norm() / expected.norm()
        print(amx_kernels() is None, layer.quantized.amx, tuple(layer.quantized.scales.shape), bool(error < 0.02))
        int8 = quantized_layer("int8", 32, weight, dtype=torch.bfloat16)
        expected = x.float() @ quantize_int8(weight).dequantize().t()
        error = (int8(x).float() - expected).norm() / expected.norm()
        print(int8.quantized.amx, tuple(int8.quantized.qweight.shape), bool(error < 0.02))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "(4,", "112,", "2)", "True", "False", "(100,", "128)", "True"]


def test_an_input_width_takes_the_largest_group_that_divides_it_or_stays_float():
    gen = torch.Generator().manual_seed(2)
    layer = quantized_layer("int4", 128, torch.randn(32, 96, generator=gen))  # 96: groups of 32
    assert layer.quantized.group_size == 32
    odd = Linear(72, 32)  # 72 columns: no group of 32 or more divides them
    # Kept in float32: as f32_linear's strips where our AVX-512 kernels run, else oneDNN's layout.
    assert odd.finalize("int4", 32, PACK) == ("float" if not PACK else "strips" if f32_strips_ops() else "packed")
    assert odd.quantized is None


def test_fused_and_row_parallel_layers_quantize_each_block_into_one_matmul():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(64, 64, generator=gen), torch.randn(32, 64, generator=gen)
    v = QuantizedWeight(4, torch.randint(0, 16, (32, 64), dtype=torch.uint8), torch.rand(32, 2), torch.randn(32, 2), 32)
    qkv = ColumnParallelLinear.qkv(64, 16, 4, 2, bias=False, parallel=None)
    for shard, weight in (("q", q), ("k", k), ("v", v)):
        qkv.load_block(qkv.weight, weight, shard)
    assert qkv.finalize("int4", 64, PACK) == "int4"
    assert qkv.quantized.group_size == 32  # the already quantized block's groups decide
    expected = torch.cat([quantize_int4(q, 32).dequantize(), quantize_int4(k, 32).dequantize(), v.dequantize()])
    x = torch.randn(5, 64, generator=gen)
    torch.testing.assert_close(qkv(x), x @ expected.t(), atol=1e-4, rtol=1e-4)

    down = RowParallelLinear(64, 48, bias=False, parallel=None)
    blocks = quantize_int4(torch.randn(48, 64, generator=gen), 32)
    down.load_columns(down.weight, blocks)
    assert down.finalize("int4", 128, PACK) == "int4"
    torch.testing.assert_close(down(x), x @ blocks.dequantize().t(), atol=1e-4, rtol=1e-4)


def test_quantized_weight_slices_like_a_checkpoint_tensor():
    q = quantize_int4(torch.randn(8, 128), 32)
    torch.testing.assert_close(q[2:5].dequantize(), q.dequantize()[2:5])
    torch.testing.assert_close(q[:, 32:96].dequantize(), q.dequantize()[:, 32:96])
    with pytest.raises(ValueError, match="split a quantization group"):
        q[:, 16:48]


def _gguf_blocks(qtype, rows: int, cols: int, gen: np.random.Generator) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # gguf cannot quantize to Q4_K: random blocks, sane scales
        blocks = gen.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
        halves = gen.uniform(1e-3, 1e-1, size=(rows, cols // 256, 2)).astype(np.float16)
        blocks[..., 0:4] = halves.view(np.uint8)
        return blocks.reshape(rows, -1)
    return gguf.quants.quantize(gen.standard_normal((rows, cols)).astype(np.float32), qtype)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
def test_gguf_blocks_read_into_codes_that_dequantize_as_gguf_does(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    blocks = _gguf_blocks(qtype, 48, 512, np.random.default_rng(0))
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    q = quantized_weight(type_name, blocks, 48, 512)
    assert q.bits == (8 if type_name == "Q8_0" else 4) and q.group_size == 32
    ours = q.dequantize()
    if type_name in ("Q4_0", "Q8_0"):  # d * (q - 8), d * q: the same float32 products
        assert torch.equal(ours, theirs)
    else:  # the codes are the file's; (q - 8) * scale + zero rounds once more than d * q + m
        scale = q.scale.repeat_interleave(32, dim=1)
        assert ((ours - theirs).abs() <= 1e-6 * scale + 1e-7 * theirs.abs()).all()


def test_llama_q_and_k_rows_are_put_back_as_transformers_does():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    blocks = gguf.quants.quantize(np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    dense = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    theirs = LlamaTensorProcessor()._reverse_permute_weights(dense, 4, 4)
    ours = unpermute_rows(quantized_weight("Q4_1", blocks, 64, 64), 4).dequantize()
    torch.testing.assert_close(ours, torch.from_numpy(np.ascontiguousarray(theirs)), atol=1e-6, rtol=1e-6)


def test_quantization_settings_are_validated(monkeypatch):
    assert EngineConfig(quantization="none").quantization is None
    assert EngineConfig().quantization == "auto"  # resolved when the model loads (below)
    with pytest.raises(ValueError, match="quantization must be 'auto', None, 'none' or one of"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="quantization_group_size"):
        EngineConfig(quantization="int4", quantization_group_size=48)
    with pytest.raises(ValueError, match="'w8a8' runs on CPUs"):
        EngineConfig(quantization="w8a8", device="cuda")
    from bento_llm.settings import load_settings

    monkeypatch.setenv("BENTO_LLM_QUANTIZATION_GROUP_SIZE", "128")
    settings = load_settings({"quantization": "int4"})
    config = settings.engine_config()
    assert (config.quantization, config.quantization_group_size) == ("int4", 128)
    assert load_settings().engine_config().quantization == "auto"
    assert load_settings({"quantization": "none"}).engine_config().quantization is None


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_no_float_copy_of_a_packed_or_quantized_weight_stays_resident(tiny_path, quantization):
    llm = LLM(str(tiny_path), num_kv_blocks=16, quantization=quantization, dtype="float32")
    runner = llm.engine.runner.model_runner
    model = runner.model
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        if isinstance(module, ParallelLMHead) and module.tied:
            assert module.weight is model.embed_tokens.weight and module.packed_weight is None
            continue
        layouts = [module.weight is not None, module.packed_weight is not None, module.quantized is not None]
        assert sum(layouts) == 1, module  # exactly one layout holds the weight
        if quantization is not None and not isinstance(module, ParallelLMHead):
            assert module.quantized is not None
    if quantization is not None:  # the embedding table too is int8 rows (test_quantized_embedding.py)
        assert [n for n, p in model.named_parameters() if p.dim() == 2] == []
    elif PACK:  # float matrices left: the embedding table only
        assert [n for n, p in model.named_parameters() if p.dim() == 2] == ["embed_tokens.weight"]
    memory = runner.memory
    assert memory["weights"] > 0 and memory["kv_cache"] == 16 * runner.bytes_per_block
    assert llm.engine.stats().resident_bytes == memory
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def write_gguf_projections(path, types: dict[str, str]) -> str:
    """A GGUF holding only decoder-block projections (name -> block type): what
    quantization="auto" reads to decide."""
    writer = gguf.GGUFWriter(str(path), "llama")
    gen = np.random.default_rng(0)
    for name, type_name in types.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        data = gguf.quants.quantize(gen.standard_normal((4, 64), dtype=np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def auto_is_int4_here() -> bool:
    """Whether quantization="auto" makes a 4-bit GGUF int4 on this CPU at dtype="auto": bfloat16
    activations with AMX's or AMD's int4 kernels, or float32 ones (no native bfloat16) with
    int4_f32_linear (AVX-512)."""
    from engine.config import cpu_has_native_bfloat16

    if cpu_has_native_bfloat16():
        return int4_kernels_beat_bfloat16() is not None
    return int4_f32_kernels() is not None


def test_quantization_auto_is_int4_only_for_a_gguf_of_4_bit_blocks_on_cpus_whose_int4_kernels_beat_its_dtype(
        tmp_path, tiny_path):
    """int4 on the file's own codes where every block projection is Q4_0/Q4_1/Q4_K, the device
    is the CPU, and our int4 kernels that measured at least as fast as the unquantized weights run
    in the activations' dtype: bfloat16 (AMX's, or AVX512-BF16's on AMD), or float32 that
    dtype="auto" chose (no native bfloat16: int4 strips on AVX-512); in every other case,
    dtype="float32" asked for (the exact mode) among them, the weights stay in dtype."""
    from types import SimpleNamespace

    from engine.gguf_weights import auto_quantization

    four_bit = write_gguf_projections(tmp_path / "q4.gguf", {"blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_1"})
    mixed = write_gguf_projections(tmp_path / "mixed.gguf", {"blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_down.weight": "Q8_0"})
    gguf_source = lambda path: SimpleNamespace(path=path, checkpoint_dtype=None)  # noqa: E731  (what a GGUF ModelSource carries)
    fast = auto_is_int4_here()
    choice, why = auto_quantization(EngineConfig(device="cpu"), gguf_source(four_bit))
    assert choice == ("int4" if fast else None), why
    choice, why = auto_quantization(EngineConfig(device="cpu"), gguf_source(mixed))
    assert choice is None and ("Q8_0" in why if fast else True), why
    for config in (EngineConfig(device="cpu", dtype="float32"), EngineConfig(device="cuda")):
        assert auto_quantization(config, gguf_source(four_bit))[0] is None, config
    safetensors = SimpleNamespace(path=str(tiny_path), checkpoint_dtype=torch.bfloat16)
    assert auto_quantization(EngineConfig(device="cpu"), safetensors) == (
        None, "not a GGUF: a float checkpoint stays float unless quantization is set")


@pytest.mark.skipif(not auto_is_int4_here(), reason="int4 is the default where AMX's, AMD's or (float32) AVX-512's int4 kernels run")
@pytest.mark.slow  # loads the default model: 15-35 s here
def test_the_default_model_is_served_in_its_own_int4_by_default_where_int4_beats_its_dtype():
    from engine.config import DEFAULT_MODEL

    llm = LLM(DEFAULT_MODEL, num_kv_blocks=16)
    assert llm.engine.config.quantization == "int4"
    model = llm.engine.runner.model_runner.model
    packed = [m.quantized for m in model.modules() if isinstance(m, Linear) and not isinstance(m, ParallelLMHead)]
    assert packed and all(q is not None and q.bits == 4 and q.group_size == 32 for q in packed)
    assert [n for n, p in model.named_parameters() if p.dim() == 2] == []  # no float matrix kept
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


@needs_amx
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_amx_at_decode_batch_rows_on_wide_inputs(group):
    """int4_mm_amx at a decode batch's rows (1-32: one row tile, two, a partial second one, 32
    strided rows) on a 3B down projection's 8192 inputs and 8256 (not a multiple of 128) beside
    576, every group size that divides them: each code through the byte permutation that makes it
    the float 128 + code. 150 outputs: 3 blocks, the last 22 columns wide, two threads splitting
    the middle one. Against the float reference, one thread and two alike."""
    ops = amx_kernels()
    threads = torch.get_num_threads()
    try:
        for cols in (576, 8192, 8256):
            if cols % group:
                continue
            gen = torch.Generator().manual_seed(cols + group)
            weight = torch.randn(150, cols, generator=gen).bfloat16()
            q = quantize_int4(weight, group)
            packed = quantized_layer("int4", group, weight, dtype=torch.bfloat16).quantized
            for rows in (1, 3, AMX_MIN_ROWS, 16, 17, 32):
                x = torch.randn(2 * rows, cols, generator=gen).bfloat16()[::2]
                with torch.inference_mode():
                    torch.set_num_threads(1)
                    alone = ops.int4_mm_amx(x, packed.qweight, packed.scales, group, 150)
                    torch.set_num_threads(2)
                    shared = ops.int4_mm_amx(x, packed.qweight, packed.scales, group, 150)
                expected = _amx_reference(packed, q, x)
                assert alone.shape == (rows, 150)
                assert (alone.float() - expected).norm() / expected.norm() < 3e-3, (cols, rows)
                assert torch.equal(shared, alone), (cols, rows)
    finally:
        torch.set_num_threads(threads)
