"""w4a8: int4 weights (a GGUF's 4-bit codes as they are) times each input row rounded to int8 per
weight group, on AVX512-VNNI (kernels/csrc/w4a8_linear.cpp): the op against a float64 reference
of the same arithmetic, its rounding error within the bound the input's rounding allows, a row's
output independent of its batch, and the engine option end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.layers.linear import Linear
from engine.layers.quant import quantize_int4
from engine.layers.quant_kernels import w4a8_kernels, w4a8_strips
from tests.helpers import outputs_by_threads_and_rows

pytestmark = pytest.mark.skipif(w4a8_kernels() is None, reason="w4a8 needs AVX-512 with AVX512-VNNI")


def rounded_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's groups rounded as the kernel rounds them: (codes [rows, K] as int64, x_scale
    [rows, K / group] float32) with code = round-half-even(x * (127 / max |x|)), x_scale = max |x| / 127."""
    groups = x.view(x.shape[0], -1, group)
    top = groups.abs().amax(dim=-1)
    inverse = torch.where(top > 0, torch.tensor(127.0) / top, torch.zeros_like(top))
    codes = (groups * inverse[..., None]).round().clamp(-127, 127)
    return codes.view_as(x).long(), top / 127


def reference_w4a8(x: torch.Tensor, q, out_features: int) -> torch.Tensor:
    """sum over groups of scale * x_scale * (integer sum of code * rounded input) + offset * x_scale
    * (integer sum of the rounded inputs), in float64 from the kernel's float32 operands."""
    group = q.group_size
    codes, x_scale = rounded_rows(x, group)
    w = q.codes.long().view(out_features, -1, group)  # [N, groups, group]
    sums = torch.einsum("rgk,ngk->rng", codes.view(x.shape[0], -1, group), w).double()  # exact integers
    scale = q.scale.float()
    offset = q.zero.float() - 8 * scale
    x_sums = (codes.view(x.shape[0], -1, group).sum(dim=-1) * x_scale).double()  # the kernel's float32 product
    step = (scale[None] * x_scale[:, None]).double()  # the kernel's float32 product scale * x_scale
    return (sums * step + x_sums[:, None] * offset[None].double()).sum(dim=-1)


def w4a8_layer(weight: torch.Tensor, group: int) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    assert layer.finalize("w4a8", group, False) == "w4a8"
    assert layer.quantized.w4a8 and layer.quantized.qweight.shape == (-(-weight.shape[0] // 16), weight.shape[1] // 8, 16, 4)
    return layer


@pytest.mark.parametrize("group", [32, 64, 256])
def test_w4a8_linear_is_int4_codes_times_each_row_rounded_to_int8_per_group(group):
    """The op equals a float64 evaluation of the same arithmetic (integer sums exact, then per
    group scale * x_scale and offset * x_scale * the rounded inputs' sum) within float32 rounding,
    at 1-33 rows (row blocks of 1-8, more than one row block; 200 outputs: a last strip of 8
    columns), with a group of zeros (x_scale 0) and an outlier among its group."""
    gen = torch.Generator().manual_seed(group)
    weight = torch.randn(200, 512, generator=gen)  # 200 outputs: a last strip of 8 columns
    q = quantize_int4(weight, group)
    codes, scales = w4a8_strips(q.codes, q.scale, q.zero)
    x = torch.randn(33, 512, generator=gen)
    x[3, :group] = 0
    x[5, 7] = 40.0  # an outlier costs only its own group's precision
    for rows in (1, 4, 9, 33):
        out = w4a8_kernels().w4a8_linear(x[:rows], codes, scales, 200)
        expected = reference_w4a8(x[:rows], q, 200)
        assert out.shape == (rows, 200)
        assert ((out.double() - expected).abs() <= 1e-5 * expected.abs() + 1e-4).all(), rows


def test_w4a8_error_is_within_what_rounding_the_inputs_allows():
    """Against the int4 weight-only product (the dequantized weight in float32), each output's
    error is at most sum over k of |w| * x_scale / 2 (each rounded input is within half a step, and
    the product is the dequantized weight's with the rounded inputs), and the bound is not vacuous:
    the error is a sizeable part of it somewhere. The weight's groups are offset as a GGUF's are
    (offset about -8 scale): the offset's term on the exact input sum would leave the codes'
    error, sum |code * scale| * x_scale / 2, several times larger."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(96, 256, generator=gen)
    q = quantize_int4(weight, 32)
    codes, scales = w4a8_strips(q.codes, q.scale, q.zero)
    x = torch.randn(16, 256, generator=gen) * torch.linspace(0.1, 5, 256)
    out = w4a8_kernels().w4a8_linear(x, codes, scales, 96).double()
    exact = F.linear(x.double(), q.dequantize().double())
    _, x_scale = rounded_rows(x, 32)
    magnitude = q.dequantize().double().abs().view(96, -1, 32).sum(dim=-1)  # [N, groups]
    bound = (magnitude[None] * x_scale.double()[:, None] / 2).sum(dim=-1)
    error = (out - exact).abs()
    assert (error <= bound + 1e-5 * exact.abs() + 1e-5).all()
    assert (error / bound).max() > 0.1
    assert ((out - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize("streaming", [False, True])
def test_a_rows_w4a8_output_does_not_depend_on_its_batch_or_threads(streaming):
    """Integer sums do not depend on their order and each output's group ends run in one order: a
    row's output is the same bits at 1-40 rows (register blocks of 1-8 rows, L2 chunks past 6, or
    up to 6 rows streamed: both loops forced) on one thread or two."""
    gen = torch.Generator().manual_seed(11)
    layer = w4a8_layer(torch.randn(200, 640, generator=gen), 32)
    x = torch.randn(40, 640, generator=gen)
    ops = w4a8_kernels()
    ops.set_w4a8_linear_streaming(streaming)
    try:
        outs = outputs_by_threads_and_rows(layer, x, (1, 2, 3, 5, 7, 8, 9, 16, 40))
    finally:
        ops.set_w4a8_linear_streaming(None)
    for (threads, rows), out in outs.items():
        assert torch.equal(out, outs[1, 40][:rows]), (threads, rows)


def test_a_nan_or_infinite_input_makes_nan_outputs_as_the_float_product_does():
    """Rounding must not hide a non-finite input: its group's scale is NaN, so every output of
    its row is NaN, and the other rows are untouched."""
    gen = torch.Generator().manual_seed(8)
    q = quantize_int4(torch.randn(48, 128, generator=gen), 32)
    codes, scales = w4a8_strips(q.codes, q.scale, q.zero)
    x = torch.randn(4, 128, generator=gen)
    clean = w4a8_kernels().w4a8_linear(x, codes, scales, 48)
    x[1, 5], x[2, 70] = float("nan"), float("inf")
    out = w4a8_kernels().w4a8_linear(x, codes, scales, 48)
    assert out[1].isnan().all() and out[2].isnan().all()
    assert torch.equal(out[[0, 3]], clean[[0, 3]])


def test_w4a8_takes_bfloat16_rows_and_returns_their_dtype():
    gen = torch.Generator().manual_seed(2)
    layer = w4a8_layer(torch.randn(64, 128, generator=gen), 32)
    x = torch.randn(3, 128, generator=gen)
    with torch.inference_mode():
        out = layer(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), layer(x.bfloat16().float()), atol=0.05, rtol=0.01)


def test_w4a8_op_names_a_bad_argument():
    q = quantize_int4(torch.randn(32, 64), 32)
    codes, scales = w4a8_strips(q.codes, q.scale, q.zero)
    ops = w4a8_kernels()
    with pytest.raises(RuntimeError, match="x: a"):
        ops.w4a8_linear(torch.randn(2, 64).double(), codes, scales, 32)
    with pytest.raises(RuntimeError, match="codes"):
        ops.w4a8_linear(torch.randn(2, 32), codes, scales, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.w4a8_linear(torch.randn(2, 64), codes, scales, 40)
    with pytest.raises(RuntimeError, match="K > 0"):
        ops.w4a8_linear(torch.randn(2, 0), codes, scales, 32)


def test_w4a8_is_a_cpu_option_whose_auto_dtype_is_float32():
    """Its kernel takes float32 rows: dtype auto is float32 even where the CPU has native bfloat16."""
    with pytest.raises(ValueError, match="quantization 'w4a8' runs on CPUs only"):
        EngineConfig(quantization="w4a8", device="cuda")
    config = EngineConfig(quantization="w4a8", device="cpu")
    assert config.torch_dtype(None) == torch.float32 and config.torch_dtype(torch.bfloat16) == torch.float32


def test_an_engine_in_w4a8_generates_the_same_tokens_in_any_batch(tiny_path):
    """A float32 model in w4a8 end to end (projections in w4a8 strips, decoder layers calling the
    op): greedy tokens of each prompt alone equal those in a batch of three."""
    llm = LLM(tiny_path, dtype="float32", quantization="w4a8", num_kv_blocks=64)
    layers = [m for m in llm.engine.runner.model_runner.model.modules() if getattr(m, "w4a8", False)]
    assert layers
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["Hello there", "The quick brown fox jumps over", "1 2 3"]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone and all(len(t) == 12 for t in together)
