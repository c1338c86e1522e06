"""Projections on CPU run through oneDNN with packed weights, and give F.linear's results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM
from engine.layers.linear import Linear, can_pack_for_cpu, packed_rows

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

    assert layer.finalize(None, 32, pack=True) == "packed"
    assert layer.packed_weight is not None and layer.weight is None  # one copy: the packed one
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


@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_a_float_bfloat16_weight_gives_f_linear_results_at_any_row_count(rows):
    """A weight kept in float (the tied LM head) runs one row through ATen's GEMV (torch.mv),
    up to 16 with the weight as the left operand, more through F.linear: all agree with the
    float32 product, in dense rows, also for strided input rows."""
    gen = torch.Generator().manual_seed(7)
    layer = Linear(96, 1000, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1000, 96, generator=gen))
    assert layer.finalize(None, 32, pack=False) == "float"
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float())
    with torch.inference_mode():
        out = layer(x)
        strided = layer(torch.cat([x, x], dim=1)[:, 96:])
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1000) and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, **TOL[torch.bfloat16])
    torch.testing.assert_close(strided.float(), expected, **TOL[torch.bfloat16])
