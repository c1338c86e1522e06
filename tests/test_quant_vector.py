"""kernels/csrc/quant_ops.cpp's vector loops, the quantized matmuls of CPUs without AMX
(int4_mm_rows, int4_mm_dpbf16, int8_mm_dpbf16: AVX512-BF16; int8_mm_rows, int8_mm_dpbusd:
AVX512-VNNI), each
called directly, so they run on AMX CPUs too (where the layer prefers the tile loops), against
float references of the same codes; and a bfloat16 layer's dispatch where there is no AMX."""

from __future__ import annotations

import pytest
import torch

from engine.layers import quant_kernels
from engine.layers.packed_weight import PackedQuantizedWeight
from engine.layers.quant import QuantizedWeight, quantize_int4, quantize_int8
from engine.layers.quant_kernels import amx_kernels, vector_kernels

OPS = vector_kernels()
needs_bf16 = pytest.mark.skipif(OPS is None, reason="needs AVX512-BF16, AVX512-VBMI and PyTorch's AVX-512 int4 layout")
needs_vnni = pytest.mark.skipif(OPS is None or not OPS.avx512_vnni_supported(), reason="needs AVX512-VNNI too")
ROWS = [1, 2, 3, 4, 7, 16, 17, 64, 257]
CPU = torch.device("cpu")


def pack(q: QuantizedWeight) -> PackedQuantizedWeight:
    packed = PackedQuantizedWeight(q, torch.bfloat16, CPU)
    assert packed.amx or packed.vector  # our kernels' layout (N padded to 64; int8: [N/64][K/4][64][4])
    return packed


def on_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return fn()
    finally:
        torch.set_num_threads(before)


def int4_weight(q: QuantizedWeight, tile: bool) -> torch.Tensor:
    """float64 values the int4 loops multiply: scales and zeros in bfloat16; tile (int4_mm_dpbf16,
    as AMX's tile): each value rounded to bfloat16 too (int4_mm_rows keeps them exact in float32)."""
    expand = lambda t: t.bfloat16().double().repeat_interleave(q.group_size, dim=1)  # noqa: E731
    w = (q.codes.double() - 8) * expand(q.scale) + expand(q.zero)
    return w.bfloat16().double() if tile else w


@needs_bf16
@pytest.mark.parametrize("op", ["int4_mm_rows", "int4_mm_dpbf16"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("outputs", [150, 576, 640])
def test_int4_vector_loops_equal_the_float_product_of_their_codes(op, group, outputs):
    """Every row count the loops' register blocks split differently (4 and 6 rows, their tails),
    150 outputs (three 64-column blocks, the last partial: on two threads one block's 32-column
    halves go to different threads, in int4_mm_rows from 4 rows), 576 (nine blocks: the middle one
    split so) and 640 (ten blocks streamed back to back), inputs centred on 1 (large
    group sums: int4_mm_rows takes the code bias out through them), rows strided. Rule: each
    output within the bfloat16 rounding of the output (2^-8 of it, with room) plus float32 sums'
    order (2e-5 of sum |x w|); two threads give bit-identical outputs to one."""
    gen = torch.Generator().manual_seed(group + outputs)
    q = quantize_int4(torch.randn(outputs, 384, generator=gen), group)
    packed = pack(q)
    w = int4_weight(q, tile=op == "int4_mm_dpbf16")
    kernel = getattr(OPS, op)
    for rows in ROWS:
        x = (torch.randn(2 * rows, 384, generator=gen) + 1).bfloat16()[::2]
        alone = on_threads(1, lambda: kernel(x, packed.qweight, packed.scales, group, outputs))
        shared = on_threads(2, lambda: kernel(x, packed.qweight, packed.scales, group, outputs))
        exact = x.double() @ w.t()
        bound = exact.abs() * 2**-8 + 2e-5 * (x.double().abs() @ w.abs().t())
        assert alone.shape == (rows, outputs) and alone.dtype == torch.bfloat16
        error = (alone.double() - exact).abs()
        assert (error <= bound).all(), (rows, (error - bound).max())
        assert torch.equal(alone, shared), rows


@needs_bf16
def test_int4_dpbf16_takes_an_input_width_of_one_group_and_a_single_block():
    """The smallest shapes: K = one group of 32, N = 16 (one partial block)."""
    gen = torch.Generator().manual_seed(2)
    q = quantize_int4(torch.randn(16, 32, generator=gen), 32)
    packed = pack(q)
    for rows in (1, 7, 13):
        x = torch.randn(rows, 32, generator=gen).bfloat16()
        out = on_threads(2, lambda: OPS.int4_mm_dpbf16(x, packed.qweight, packed.scales, 32, 16))
        exact = x.double() @ int4_weight(q, tile=True).t()
        assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all(), rows


def int8_bound(x: torch.Tensor, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product of the int8 loops' weight (codes times bfloat16 scales) and their error
    bound: each input element within max |x| / 65534 (the 16-bit split), so each output within
    that times the column's sum of |w|, plus the output's bfloat16 rounding (2^-8 of it, with room)."""
    w = q.codes.double() * q.scale.reshape(-1, 1).bfloat16().double()
    exact = x.double() @ w.t()
    bound = (x.double().abs().amax(1, keepdim=True) / 65534) @ w.abs().sum(1, keepdim=True).t()
    return exact, 1.01 * bound + exact.abs() * 2**-8


@needs_vnni
@pytest.mark.parametrize("op", ["int8_mm_rows", "int8_mm_dpbusd"])
@pytest.mark.parametrize("inputs,outputs", [(106, 150), (576, 640), (64, 64)])
def test_int8_vector_loops_stay_within_the_split_inputs_bound(op, inputs, outputs):
    """Every row count the loops' register blocks split differently (2 and 3 rows, their tails),
    106 inputs (K padded to 128 with zero codes), partial and whole blocks, one row in two with an
    outlier 10^4 times the rest (its small elements keep few bits: the bound still holds), rows
    strided; two threads give bit-identical outputs to one."""
    gen = torch.Generator().manual_seed(inputs + outputs)
    q = quantize_int8(torch.randn(outputs, inputs, generator=gen))
    packed = pack(q)
    kernel = getattr(OPS, op)
    for rows in ROWS:
        x = torch.randn(2 * rows, inputs, generator=gen)
        x[::4, 7] = 1e4 * x[::4, 7].sign()
        x = x.bfloat16()[::2]
        alone = on_threads(1, lambda: kernel(x, packed.qweight, packed.scales, outputs))
        shared = on_threads(2, lambda: kernel(x, packed.qweight, packed.scales, outputs))
        exact, bound = int8_bound(x, q)
        assert alone.shape == (rows, outputs) and alone.dtype == torch.bfloat16
        error = (alone.double() - exact).abs()
        assert (error <= bound).all(), (rows, (error - bound).max())
        assert torch.equal(alone, shared), rows


@needs_vnni
@pytest.mark.parametrize("inputs,outputs", [(106, 150), (576, 49), (1536, 640)])
def test_int8_rows_streaming_and_prefetching_loops_give_the_same_bits_within_the_bound(inputs, outputs):
    """int8_mm_rows' two loops (set_int8_rows_streaming: the row's high-plane sum taken off, no
    prefetch; the columns' code sums taken off, prefetch), whichever the CPU's rule picks: the same
    exact integer sums, so the same bits, within the split input's bound, on one thread and two.
    106 inputs (K padded to 128 with zero codes), 49 outputs (one partial block), codes -128 and 127
    (w + 128 at the byte's ends), inputs centred on 3 with an outlier 10^4 times the rest in one row
    in two (high planes near +-128: large row sums), rows strided."""
    gen = torch.Generator().manual_seed(inputs + outputs)
    q = quantize_int8(torch.randn(outputs, inputs, generator=gen))
    q.codes[0, :3], q.codes[-1, -3:], q.codes[outputs // 2, ::7] = -128, 127, -128
    packed = pack(q)
    try:
        for rows in [1, 2, 3, 16, 64, 257]:
            x = torch.randn(2 * rows, inputs, generator=gen) + 3
            x[::4, 7] = 1e4 * x[::4, 7].sign()
            x = x.bfloat16()[::2]
            exact, bound = int8_bound(x, q)
            outs = []
            for streaming in (True, False):
                OPS.set_int8_rows_streaming(streaming)
                for threads in (1, 2):
                    out = on_threads(threads, lambda: OPS.int8_mm_rows(x, packed.qweight, packed.scales, outputs))
                    assert out.shape == (rows, outputs) and out.dtype == torch.bfloat16
                    error = (out.double() - exact).abs()
                    assert (error <= bound).all(), (rows, streaming, threads, (error - bound).max())
                    outs.append(out)
            assert all(torch.equal(out, outs[0]) for out in outs[1:]), rows
    finally:
        OPS.set_int8_rows_streaming(None)  # the CPU's rule again


def int8_exact(x: torch.Tensor, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product of int8_mm_dpbf16's weight (codes times bfloat16 scales, the input as it
    is) and its bound: the output's bfloat16 rounding (2^-8 of it, with room) plus float32 sums'
    order (2e-5 of sum |x w|)."""
    w = q.codes.double() * q.scale.reshape(-1, 1).bfloat16().double()
    exact = x.double() @ w.t()
    return exact, exact.abs() * 2**-8 + 2e-5 * (x.double().abs() @ w.abs().t())


@needs_bf16
@pytest.mark.parametrize("inputs,outputs", [(106, 150), (105, 100), (576, 640), (64, 64), (1536, 200)])
def test_int8_dpbf16_equals_the_float_product_of_its_codes(inputs, outputs):
    """Every row count its register blocks split differently (6 rows, the tails), 106 and 105
    inputs (K padded to 128 with zero codes; an odd K: one zero input column more), partial and
    whole blocks, codes -128 and 127 (every code is a bfloat16 value exactly), an outlier 10^4
    times the rest in one row in two, rows strided. Two threads give bit-identical outputs to one."""
    gen = torch.Generator().manual_seed(inputs + outputs)
    q = quantize_int8(torch.randn(outputs, inputs, generator=gen))
    q.codes[0, :3], q.codes[-1, -3:], q.codes[outputs // 2, ::7] = -128, 127, -128
    packed = pack(q)
    for rows in ROWS:
        x = torch.randn(2 * rows, inputs, generator=gen)
        x[::4, 7] = 1e4 * x[::4, 7].sign()
        x = x.bfloat16()[::2]
        alone = on_threads(1, lambda: OPS.int8_mm_dpbf16(x, packed.qweight, packed.scales, outputs))
        shared = on_threads(2, lambda: OPS.int8_mm_dpbf16(x, packed.qweight, packed.scales, outputs))
        exact, bound = int8_exact(x, q)
        assert alone.shape == (rows, outputs) and alone.dtype == torch.bfloat16
        error = (alone.double() - exact).abs()
        assert (error <= bound).all(), (rows, (error - bound).max())
        assert torch.equal(alone, shared), rows


@needs_vnni
def test_int8_dpbusd_equals_the_few_row_loop_it_extends():
    """Same split input, same integer sums, same float combination: the same bits as
    int8_mm_rows, row for row (inputs centred on 3: large column-sum corrections)."""
    gen = torch.Generator().manual_seed(4)
    q = quantize_int8(torch.randn(200, 320, generator=gen))
    packed = pack(q)
    x = (torch.randn(17, 320, generator=gen) + 3).bfloat16()
    with torch.inference_mode():
        assert torch.equal(OPS.int8_mm_dpbusd(x, packed.qweight, packed.scales, 200),
                           OPS.int8_mm_rows(x, packed.qweight, packed.scales, 200))


@needs_bf16
@pytest.mark.parametrize("op", ["int8_mm_dpbusd", "int8_mm_dpbf16"])
def test_int8_many_row_loops_pass_a_nan_on_round_a_vanishing_row_to_zero_and_refuse_wide_inputs(op):
    """int8_mm_dpbusd: a row whose scale underflows rounds to 0; int8_mm_dpbf16: subnormal
    products count as 0 (vdpbf16ps); either way under 1e-30."""
    if op == "int8_mm_dpbusd" and not OPS.avx512_vnni_supported():
        pytest.skip("needs AVX512-VNNI too")
    kernel = getattr(OPS, op)
    gen = torch.Generator().manual_seed(6)
    packed = pack(quantize_int8(torch.randn(100, 576, generator=gen)))
    x = torch.randn(5, 576, generator=gen)
    x[0, 5] = float("nan")
    x[1] = x[1] * 1e-36
    x = x.bfloat16()
    with torch.inference_mode():
        out = kernel(x, packed.qweight, packed.scales, 100).float()
        alone = kernel(x[2:].contiguous(), packed.qweight, packed.scales, 100).float()
    assert out[0].isnan().all() and out[1].abs().max() < 1e-30 and torch.equal(out[2:], alone)
    with pytest.raises(RuntimeError, match="at most 65536 inputs"):
        kernel(torch.ones(3, 65600, dtype=torch.bfloat16), torch.ones(1, 65600 // 4, 64, 4, dtype=torch.int8),
                           torch.ones(64, dtype=torch.bfloat16), 64)


@needs_bf16
def test_whole_weight_conversions_run_on_the_vector_units():
    """int4/int8_dequantize (prefill-sized inputs, a tied embedding's rows) need AVX512-BF16 and
    VBMI, not AMX: [K, N] of exactly the bfloat16 values, int8's rows padding K zero."""
    gen = torch.Generator().manual_seed(8)
    q4 = quantize_int4(torch.randn(100, 384, generator=gen), 64)
    expected = int4_weight(q4, tile=True).float().bfloat16()
    packed = pack(q4)
    assert torch.equal(OPS.int4_dequantize(packed.qweight, packed.scales, 64, 100), expected.t())
    q8 = quantize_int8(torch.randn(100, 106, generator=gen))
    packed = PackedQuantizedWeight(q8, torch.bfloat16, CPU)
    if packed.amx or packed.vector:
        dense = OPS.int8_dequantize(packed.qweight, packed.scales, 100)
        expected = (q8.codes.float() * q8.scale.reshape(-1, 1).bfloat16().float()).bfloat16()
        assert dense.shape == (128, 100) and torch.equal(dense[:106], expected.t()) and not dense[106:].any()
        assert torch.equal(packed.int8_rows(torch.tensor([3, 99, 0])), q8.codes[[3, 99, 0]])


@pytest.mark.skipif(OPS is None or amx_kernels() is not None, reason="the dispatch of CPUs with AVX512-BF16 and no AMX")
@pytest.mark.parametrize("bits", [4, 8])
def test_a_bfloat16_layer_without_amx_takes_each_vector_loop_from_its_row_threshold(bits):
    gen = torch.Generator().manual_seed(bits)
    q = quantize_int4(torch.randn(200, 96, generator=gen), 32) if bits == 4 else quantize_int8(torch.randn(200, 96, generator=gen))
    packed = PackedQuantizedWeight(q, torch.bfloat16, CPU)
    if bits == 8 and not OPS.avx512_vnni_supported():
        assert not packed.vector and packed.qweight.shape == (200, 96)  # PyTorch's [N][K] for its op
        return
    assert packed.vector and not packed.amx
    # int8 beyond its few-row loop: the byte products, or (AMD: cpu_features.h) the bfloat16 loop
    split_bytes = OPS.int8_split_bytes_preferred()
    int8_many = OPS.int8_mm_dpbusd if split_bytes else OPS.int8_mm_dpbf16
    few = (quant_kernels.vector_int4_rows_max_rows() if bits == 4 else quant_kernels.VECTOR_INT8_ROWS_MAX_ROWS if split_bytes
           else quant_kernels.VECTOR_INT8_DPBF16_ROWS_MAX_ROWS)
    for rows in (1, few, few + 1, 40, 2048):  # no whole-weight conversion at prefill sizes either
        x = torch.randn(rows, 96, generator=gen).bfloat16()
        with torch.inference_mode():
            if bits == 4:
                op = OPS.int4_mm_rows if rows <= few else OPS.int4_mm_dpbf16
                expected = op(x, packed.qweight, packed.scales, 32, 200)
            else:
                op = OPS.int8_mm_rows if rows <= few else int8_many
                expected = op(x, packed.qweight, packed.scales, 200)
            assert torch.equal(packed(x), expected), rows


@needs_bf16
@pytest.mark.parametrize("op", ["int4_mm_rows", "int4_mm_dpbf16"])
def test_int4_vector_loops_on_a_3b_projections_wide_inputs(op):
    """8256 inputs (a 3B down projection's 8192 and a partial 128-group more; 1 MB converted tile
    per thread for int4_mm_dpbf16), groups 32 and 64, against the float reference."""
    for group in (32, 64):
        gen = torch.Generator().manual_seed(group)
        q = quantize_int4(torch.randn(150, 8256, generator=gen), group)
        packed = pack(q)
        w = int4_weight(q, tile=op == "int4_mm_dpbf16")
        for rows in (1, 7, 17):
            x = torch.randn(rows, 8256, generator=gen).bfloat16()
            out = on_threads(2, lambda: getattr(OPS, op)(x, packed.qweight, packed.scales, group, 150))
            exact = x.double() @ w.t()
            bound = exact.abs() * 2**-8 + 2e-5 * (x.double().abs() @ w.abs().t())
            assert ((out.double() - exact).abs() <= bound).all(), (group, rows)
