"""The Triton fused-MoE kernel (kernels/triton_moe.py) against the per-token loop and the torch
MoE layer, on random inputs with uneven routing: an expert no token picks, one nearly every
token picks, several experts per token, sizes that fill no tile.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest) and
unchanged on a CUDA device with TRITON_INTERPRET=0 (bench/gpu_check.sh). The seed is printed and
KERNEL_TEST_SEED=<n> replays it (the gen fixture, tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.attention import AttentionBackend  # noqa: E402
from engine.forward_context import AttentionMetadata, forward_context  # noqa: E402
from engine.layers.moe import FusedMoE, route  # noqa: E402
from kernels import triton_moe, triton_ops  # noqa: E402
from tests.test_kernels import DEVICE  # noqa: E402  (CUDA unless under the interpreter)
from tests.test_models_families import reference_moe  # noqa: E402

# fp32: only summation order differs. Half precision: the oracle runs in fp32 on the same
# (representable) inputs; the kernel rounds the activations and each expert's output once.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    # bfloat16 keeps 8 significant bits and the kernel rounds act(gate) * up (values up to ~10 here)
    # to it before the down projection: seed 70444548 put one output in 1856 0.083 away (was atol 6e-2).
    torch.bfloat16: dict(atol=1e-1, rtol=6e-2),
}


def make_moe(gen, num_experts, top_k, hidden, inter, act="silu", renormalize=True, dtype=torch.float32) -> FusedMoE:
    moe = FusedMoE(num_experts, top_k, hidden, inter, renormalize, act, parallel=None)
    with torch.no_grad():
        moe.w13.copy_(torch.randn(moe.w13.shape, generator=gen) * 0.3)
        moe.w2.copy_(torch.randn(moe.w2.shape, generator=gen) * 0.3)
    return moe.to(device=DEVICE, dtype=dtype)


def skewed_logits(gen, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Router logits where expert 0 is in (almost) every token's top k and the last expert in none."""
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    # +6 standard deviations: a fresh seed every run must never push expert 0 out of a token's
    # top 2 (at +3 one token in about a hundred lost it, and the test's own premise failed).
    logits[:, 0] += 6.0
    logits[:, -1] -= 10.0
    return logits


# (tokens, experts, top_k, hidden, intermediate, activation, N and K tile): a decode token; odd
# sizes that fill no tile, with the default tiles and with 16-wide ones (several column tiles and
# trips through the K loop, masked tails in both); enough tokens per expert for 64-row tiles;
# top-1 over many experts; Gemma's GELU.
CASES = [
    pytest.param(1, 8, 2, 64, 32, "silu", None, id="one-token"),
    pytest.param(37, 6, 3, 40, 24, "silu", None, id="odd-sizes-top3"),
    pytest.param(37, 6, 3, 40, 24, "silu", 16, id="odd-sizes-top3-small-tiles"),
    pytest.param(150, 4, 2, 48, 56, "silu", None, id="tall-tiles"),
    pytest.param(23, 16, 1, 32, 16, "silu", None, id="top1-16-experts"),
    pytest.param(19, 5, 2, 24, 40, "gelu_pytorch_tanh", 16, id="gelu-tanh"),
]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,act,tile", CASES)
def test_fused_moe_kernel_equals_the_per_token_loop(gen, num_tokens, num_experts, top_k, hidden, inter, act, tile):
    moe = make_moe(gen, num_experts, top_k, hidden, inter, act)
    x = torch.randn(num_tokens, hidden, generator=gen)
    logits = skewed_logits(gen, num_tokens, num_experts)
    weights, experts = route(logits, top_k, renormalize=True)
    counts = torch.bincount(experts.flatten(), minlength=num_experts)
    assert counts[-1] == 0 and counts[0] == counts.max()  # the routing is as uneven as promised
    out = triton_moe.fused_moe(x.to(DEVICE), moe.w13, moe.w2, weights.to(DEVICE), experts.to(DEVICE), act,
                               block_n=tile, block_k=tile)
    assert out.shape == x.shape and not out.isnan().any()
    torch.testing.assert_close(out.cpu(), reference_moe(moe, x, logits), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_moe_kernel_in_half_precision_accumulates_in_fp32(gen, dtype):
    moe = make_moe(gen, 6, 2, 64, 48, dtype=dtype)
    x = torch.randn(29, 64, generator=gen).to(dtype)
    logits = skewed_logits(gen, 29, 6)
    weights, experts = route(logits, 2, renormalize=True)
    out = triton_moe.fused_moe(x.to(DEVICE), moe.w13, moe.w2, weights.to(DEVICE), experts.to(DEVICE))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), reference_moe(moe, x, logits), **TOL[dtype])


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_to_experts_gives_each_tile_one_expert_and_each_pair_one_row(gen, block_m):
    num_tokens, num_experts, top_k = 41, 7, 3
    experts = route(skewed_logits(gen, num_tokens, num_experts), top_k, renormalize=False)[1]
    sorted_pairs, tile_expert, num_padded = triton_moe.align_to_experts(experts, num_experts, block_m)
    num_pairs = num_tokens * top_k
    used = int(num_padded)
    assert used % block_m == 0 and used <= sorted_pairs.numel() == tile_expert.numel() * block_m
    rows = sorted_pairs[:used]
    real = rows[rows < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair once
    assert (sorted_pairs[used:] == num_pairs).all()  # past the end: padding only
    flat = experts.flatten()
    for tile in range(used // block_m):
        pairs = sorted_pairs[tile * block_m : (tile + 1) * block_m]
        pairs = pairs[pairs < num_pairs].long()
        assert len(pairs) > 0, "a tile of padding only: the alignment wasted a whole tile"
        assert (flat[pairs] == tile_expert[tile]).all()
        assert pairs.tolist() == sorted(pairs.tolist())  # token order kept within an expert
    assert (tile_expert[used // block_m :] == num_experts).all()
    assert num_experts - 1 not in tile_expert[: used // block_m].tolist()  # the unpicked expert gets no tile


def test_fused_moe_of_no_tokens_is_empty(gen):
    moe = make_moe(gen, 4, 2, 32, 16)
    x = torch.zeros(0, 32, device=DEVICE)
    empty = torch.zeros(0, 2, device=DEVICE)
    assert triton_moe.fused_moe(x, moe.w13, moe.w2, empty, empty.long()).shape == (0, 32)


def test_fused_moe_refuses_an_activation_it_lacks_and_mismatched_weights(gen):
    moe = make_moe(gen, 4, 2, 32, 16)
    x = torch.randn(3, 32, generator=gen).to(DEVICE)
    weights, experts = route(torch.randn(3, 4, generator=gen).to(DEVICE), 2, renormalize=True)
    with pytest.raises(ValueError, match="no activation 'relu'"):
        triton_moe.fused_moe(x, moe.w13, moe.w2, weights, experts, "relu")
    with pytest.raises(ValueError, match="do not fit"):
        triton_moe.fused_moe(x[:, :16], moe.w13, moe.w2, weights, experts)


def run_layer(moe: FusedMoE, backend_name: str, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    backend = AttentionBackend(backend_name, [], [])
    meta = AttentionMetadata(*(torch.zeros(1),) * 4, max_query_len=1, all_decode=True)
    with torch.no_grad(), forward_context(meta, backend, torch.zeros(1)):
        return moe(x.to(DEVICE), logits.to(DEVICE)).cpu()


@pytest.mark.parametrize("renormalize", [True, False])
def test_the_moe_layer_runs_the_kernel_on_the_triton_backend_and_equals_the_torch_backend(gen, monkeypatch,
                                                                                         renormalize):
    moe = make_moe(gen, 6, 3, 40, 24, renormalize=renormalize)
    x, logits = torch.randn(37, 40, generator=gen), skewed_logits(gen, 37, 6)
    launches = []
    real = triton_ops.fused_moe
    monkeypatch.setattr(triton_ops, "fused_moe", lambda *args: launches.append(args) or real(*args))
    out = run_layer(moe, "triton", x, logits)
    assert len(launches) == 1
    torch.testing.assert_close(out, run_layer(moe, "torch", x, logits), **TOL[torch.float32])
    torch.testing.assert_close(out, reference_moe(moe, x, logits), **TOL[torch.float32])

