"""The Triton backend's per-token kernels (kernels/triton_pointwise.py) give reference.py's results on
random inputs: RMSNorm with and without the residual add, silu-and-mul and the rotary embedding, in
float32, bfloat16 and float16, over row counts a step has (none, one, odd, many), widths that are no
power of two, and the strided q/k view of a fused projection.

The rule (assert_close_to_reference): float32 and float16 within 4 units of their precision of each
value plus 4 of its row's largest (float32 reduction order, 1/sqrt for rsqrt, the exponential's
implementation); bfloat16 within 2 steps, since Triton's interpreter (CPU runs) truncates on the way
to bfloat16 where a GPU rounds. On a CUDA machine the same tests run the
compiled kernels on the card.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels import triton_pointwise as pointwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0, 64), (1, 72), (5, 576), (33, 130), (64, 2048)]
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    """|got - want| <= k units of the dtype's precision (2^-mantissa bits) times |want| plus k times
    the largest |want| of its row (the terms a sum cancels are of the row's size): k = 4 in float32
    and float16, 2 bfloat16 steps (the interpreter truncates twice where a GPU rounds)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if not want.numel():
        return
    k = 2 if want.dtype == torch.bfloat16 else 4
    precision = 2.0 ** -MANTISSA_BITS[want.dtype]
    flat_got, flat_want = got.float().flatten(1), want.float().flatten(1)
    bound = k * precision * (flat_want.abs() + flat_want.abs().amax(dim=1, keepdim=True))
    error = (flat_got - flat_want).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f} of the bound ({want.dtype}): max |got - want| {error.max().item():.3g}"


def random_rows(rows: int, n: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(rows, n, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_rms_norm_gives_the_reference_norm(dtype, rows, n):
    torch.manual_seed(rows * 1000 + n)
    x, weight = random_rows(rows, n, dtype), torch.rand(n, device=DEVICE) + 0.5
    assert_close_to_reference(pointwise.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_add_rms_norm_adds_the_residual_in_place_and_gives_the_reference_norm(dtype, rows, n):
    torch.manual_seed(rows * 1000 + n + 1)
    x, weight = random_rows(rows, n, dtype), torch.rand(n, device=DEVICE) + 0.5
    residual = random_rows(rows, n, dtype)
    ours, theirs = residual.clone(), residual.clone()
    got = pointwise.add_rms_norm(ours, x, weight, 1e-5)
    want = reference.add_rms_norm(theirs, x, weight, 1e-5)
    assert_close_to_reference(ours, theirs)  # the residual stream, updated in place
    assert_close_to_reference(got, want)
    if rows:
        assert not torch.equal(ours, residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_silu_mul_gives_the_reference_activation(dtype, rows, n):
    torch.manual_seed(rows * 1000 + n + 2)
    gate_up = random_rows(rows, 2 * n, dtype, scale=4.0)
    if rows:  # exp(-gate) overflowing, a saturated gate, zero
        gate_up[0, :3] = torch.tensor([-200.0, 90.0, 0.0], device=DEVICE).to(dtype)
    assert_close_to_reference(pointwise.silu_mul(gate_up), reference.silu_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 1, 128), (3, 12, 64), (7, 5, 8), (40, 15, 64), (4, 3, 96), (2, 4, 256)])
def test_rotary_embedding_turns_the_q_and_k_heads_of_a_fused_projection_in_place(dtype, tokens, heads, head_dim):
    """qk is the first heads of a [tokens, (heads + v heads) * head_dim] projection: strided rows; the
    v heads after it stay as they are."""
    torch.manual_seed(tokens * 100 + heads)
    qkv = random_rows(tokens, (heads + 2) * head_dim, dtype, scale=1.0)
    angles = torch.rand(tokens, 1, head_dim // 2, device=DEVICE) * 6.3
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype)  # signed for the first half (RotaryEmbedding.table)
    ours, theirs = qkv.clone(), qkv.clone()
    pointwise.rotary_embedding_(ours[:, : heads * head_dim].view(tokens, heads, head_dim), cos, sin)
    reference.rotary_embedding_(theirs[:, : heads * head_dim].view(tokens, heads, head_dim), cos, sin)
    assert_close_to_reference(ours, theirs)
    assert torch.equal(ours[:, heads * head_dim:], qkv[:, heads * head_dim:])
    assert not torch.equal(ours[:, : heads * head_dim], qkv[:, : heads * head_dim])


def test_layouts_the_kernels_do_not_take_go_to_reference():
    """A last dimension that is not dense (a transposed view), or rotary tables broadcast over the
    tokens or in another dtype, give reference's result all the same."""
    torch.manual_seed(3)
    x = torch.randn(96, 12, device=DEVICE).t()  # [12, 96], rows dense in no dimension's sense
    weight = torch.rand(96, device=DEVICE) + 0.5
    assert x.stride(1) != 1
    assert torch.equal(pointwise.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    gate_up = torch.randn(40, 6, device=DEVICE).t()
    assert torch.equal(pointwise.silu_mul(gate_up), reference.silu_mul(gate_up))
    qkv = torch.randn(3, 4 * 16, device=DEVICE, dtype=torch.bfloat16)
    angles = torch.rand(1, 1, 8, device=DEVICE)
    for cos, sin in ((torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([-angles.sin(), angles.sin()], -1).bfloat16()),
                     (torch.cat([angles.cos()] * 2, -1).expand(3, 1, 16).float(), torch.cat([-angles.sin(), angles.sin()], -1).expand(3, 1, 16).float())):
        ours, theirs = qkv.clone(), qkv.clone()
        pointwise.rotary_embedding_(ours[:, :32].view(3, 2, 16), cos, sin)
        reference.rotary_embedding_(theirs[:, :32].view(3, 2, 16), cos, sin)
        assert torch.equal(ours, theirs)
