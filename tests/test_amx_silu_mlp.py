"""The SwiGLU MLP as one AMX op at decode batch sizes (amx_silu_mlp, kernels/csrc/amx_linear.cpp):
gate/up, silu(gate) * up and down in one parallel region, each thread on a slice of the
intermediate width. Checked against the float32 product on random inputs, against the unfused
path the engine runs past its rows, and where it must not be used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionBackend
from engine.forward_context import forward_context
from engine.layers.linear_kernels import amx_linear_ops
from engine.models.llama import GatedMLP

pytestmark = pytest.mark.skipif(amx_linear_ops() is None, reason="no AMX tiles on this machine")


def reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """In float32, gate/up's product rounded to bfloat16 as the unfused path stores it."""
    gate, up = F.linear(x.float(), gate_up.float()).to(torch.bfloat16).float().chunk(2, dim=-1)
    return F.linear((F.silu(gate) * up).to(torch.bfloat16).float(), down.float())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("hidden, inter, out", [(576, 1536, 576), (64, 96, 40), (96, 32, 17), (128, 320, 1000),
                                                (512, 736, 520)])
def test_the_fused_mlp_equals_the_float_product(threads, rows, hidden, inter, out):
    """Odd shapes: MLPs over 1 MiB of weights split over two threads (1536, and 736: 23 K steps,
    slices of 11 and 12), smaller ones on one; an intermediate width of one K step (32); output
    widths not a multiple of 16 columns; input rows not contiguous. The error is bfloat16's
    rounding."""
    ops = amx_linear_ops()
    gen = torch.Generator().manual_seed(rows * 7 + inter)
    gate_up = (torch.randn(2 * inter, hidden, generator=gen) / hidden**0.5).to(torch.bfloat16)
    down = (torch.randn(out, inter, generator=gen) / inter**0.5).to(torch.bfloat16)
    x = torch.randn(rows, 2 * hidden, generator=gen).to(torch.bfloat16)[:, hidden:]  # row stride 2 K
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops.amx_silu_mlp(x, ops.amx_linear_pack(gate_up), ops.amx_linear_pack(down), out)
    finally:
        torch.set_num_threads(previous)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
    torch.testing.assert_close(y.float(), reference(x, gate_up, down), atol=2e-2, rtol=2e-2)


def finalized_mlp(hidden: int, inter: int, act: str, bias: bool = False) -> GatedMLP:
    mlp = GatedMLP(hidden, inter, act, bias, None).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(inter)
    with torch.no_grad():
        for proj in (mlp.gate_up_proj, mlp.down_proj):
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) / proj.in_features**0.5)
            if bias:
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen))
            assert proj.finalize(None, 32, pack=True) == "strips"
    return mlp


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_the_engine_fuses_a_silu_mlp_at_decode_rows_and_equals_the_unfused_path(rows):
    """Up to 16 rows GatedMLP calls the fused op, past them the three calls; the fused result is
    the unfused one's within one bfloat16 rounding (the float32 partial sums of the threads' slices
    are added before the single rounding)."""
    mlp = finalized_mlp(192, 320, "silu")
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    with torch.inference_mode(), forward_context(None, AttentionBackend("cpu", [], []), None):
        fused = mlp(x)
        assert mlp.fused_rows == 16
        mlp.fused_rows = 0
        unfused = mlp(x)
    torch.testing.assert_close(fused.float(), unfused.float(), atol=1e-2, rtol=1e-2)


def test_what_the_fused_op_cannot_compute_stays_unfused():
    """GeGLU (Gemma's activation) and projections with biases keep the three calls."""
    x = torch.randn(1, 192).to(torch.bfloat16)
    for mlp in (finalized_mlp(192, 320, "gelu_pytorch_tanh"), finalized_mlp(192, 320, "silu", bias=True)):
        with torch.inference_mode(), forward_context(None, AttentionBackend("cpu", [], []), None):
            mlp(x)
        assert mlp.fused_rows == 0


def test_the_fused_op_refuses_what_it_cannot_read():
    ops = amx_linear_ops()
    gate_up = ops.amx_linear_pack(torch.randn(128, 64).to(torch.bfloat16))
    down = ops.amx_linear_pack(torch.randn(40, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        ops.amx_silu_mlp(torch.randn(17, 64).to(torch.bfloat16), gate_up, down, 40)
    with pytest.raises(RuntimeError, match="columns"):
        ops.amx_silu_mlp(torch.randn(1, 96).to(torch.bfloat16), gate_up, down, 40)
    with pytest.raises(RuntimeError, match="implies"):
        ops.amx_silu_mlp(torch.randn(1, 64).to(torch.bfloat16), gate_up, ops.amx_linear_pack(
            torch.randn(40, 32).to(torch.bfloat16)), 40)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.amx_silu_mlp(torch.randn(1, 64).to(torch.bfloat16), gate_up, down, 60)
