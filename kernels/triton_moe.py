"""Triton fused mixture of experts: the MoE layer's experts in two grouped GEMM launches.

The torch path (engine/layers/moe.py) loops over experts on the host; here the loop is the grid.
1. `align_to_experts` sorts the (token, choice) pairs by expert and pads each expert's run to a
   multiple of BLOCK_M, so every BLOCK_M-row tile belongs to exactly one expert (the idea of
   vLLM's moe_align_block_size, written in torch ops). It never reads a device value on the host:
   the buffers are sized by the worst case (every expert with tokens wastes at most BLOCK_M - 1
   rows) and tiles past the padded total exit at once, so the launch grid comes from shapes only.
2. Gate/up: each program multiplies one expert tile of token rows by a BLOCK_N slice of that
   expert's gate rows and the matching up rows, and writes act(gate) * up: the activation is
   fused, the [pairs, 2 * I] product never reaches memory.
3. Down: the same tiling over the [pairs, I] activations and the expert's down rows; each row
   is scaled by its routing weight in the float32 accumulator.
4. Each token's top_k rows are summed in torch (a [tokens, top_k, H] sum: deterministic, no
   atomics).
Accumulation is float32. Tensor parallel needs nothing here: every rank holds its slice of each
expert's intermediate columns and the layer all-reduces the sum, as on the torch path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter's half-precision arithmetic is not trustworthy: under it every dot runs in fp32.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# engine/layers/activation.py's gated activation names -> the kernel's ACT code.
_ACT_CODES = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:  # silu(x) = x * sigmoid(x); exp overflowing to inf gives -0, not NaN
        y = x / (1.0 + tl.exp(-x))
    else:  # gelu, tanh approximation; tanh(u) = 1 - 2 / (e^2u + 1) saturates cleanly at +-1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    return y


@triton.jit
def _tile_rows(sorted_pairs_ptr, num_padded_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """This program's pair ids, whether each row is a real pair, and whether the tile has any."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = tl.program_id(0) * BLOCK_M < tl.load(num_padded_ptr)
    pair = tl.load(sorted_pairs_ptr + rows).to(tl.int64)
    return pair, pair < num_pairs, live


@triton.jit(do_not_specialize=["num_pairs"])  # per step: one compile for every batch
def _gate_up_kernel(
    out_ptr, x_ptr, w13_ptr, sorted_pairs_ptr, tile_expert_ptr, num_padded_ptr,
    num_pairs, inter, hidden,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_ot, stride_on,
    TOP_K: tl.constexpr, ACT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair, row_ok, live = _tile_rows(sorted_pairs_ptr, num_padded_ptr, num_pairs, BLOCK_M)
    if live:
        token = pair // TOP_K
        expert = tl.load(tile_expert_ptr + tl.program_id(0)).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        w = w13_ptr + expert * stride_we
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden
            a = tl.load(x_ptr + token[:, None] * stride_xt + k[None, :] * stride_xh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w_gate = tl.load(w + n[None, :] * stride_wn + k[:, None] * stride_wh, mask=w_mask, other=0.0)
            w_up = tl.load(w + (inter + n[None, :]) * stride_wn + k[:, None] * stride_wh, mask=w_mask, other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                acc_gate += tl.dot(a, w_gate.to(tl.float32), input_precision="ieee")
                acc_up += tl.dot(a, w_up.to(tl.float32), input_precision="ieee")
            else:
                acc_gate += tl.dot(a, w_gate)
                acc_up += tl.dot(a, w_up)
        h = _activation(acc_gate, ACT) * acc_up
        tl.store(out_ptr + pair[:, None] * stride_ot + n[None, :] * stride_on, h.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])  # per step: one compile for every batch
def _down_kernel(
    out_ptr, h_ptr, w2_ptr, routing_weights_ptr, sorted_pairs_ptr, tile_expert_ptr, num_padded_ptr,
    num_pairs, hidden, inter,
    stride_ht, stride_hi, stride_we, stride_wn, stride_wi, stride_ot, stride_on,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair, row_ok, live = _tile_rows(sorted_pairs_ptr, num_padded_ptr, num_pairs, BLOCK_M)
    if live:
        expert = tl.load(tile_expert_ptr + tl.program_id(0)).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        w = w2_ptr + expert * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < inter
            a = tl.load(h_ptr + pair[:, None] * stride_ht + k[None, :] * stride_hi,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w + n[None, :] * stride_wn + k[:, None] * stride_wi,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        routing_weight = tl.load(routing_weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * routing_weight[:, None]
        tl.store(out_ptr + pair[:, None] * stride_ot + n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def align_to_experts(experts: torch.Tensor, num_experts: int, block_m: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """experts [tokens, top_k] -> (sorted_pairs, tile_expert, num_padded):
    sorted_pairs int32 [tiles * block_m]: flat pair ids (token * top_k + choice) grouped by expert,
      each expert's run padded to a multiple of block_m with the id tokens * top_k (no pair);
    tile_expert int32 [tiles]: the expert of each block_m-row tile (num_experts past the end);
    num_padded int32 [1]: rows in use (a device tensor: the host never waits for it).
    Within an expert, pairs keep token order."""
    flat = experts.flatten().long()
    num_pairs = flat.numel()
    device = flat.device
    # scatter_add_, not bincount: bincount reads its input's max on the host.
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    expert_of_sorted = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[expert_of_sorted]
    dest = (padded_end - padded)[expert_of_sorted] + rank_in_expert
    tiles = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    sorted_pairs = torch.full((tiles * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    tile_starts = torch.arange(tiles, device=device) * block_m
    tile_expert = torch.searchsorted(padded_end, tile_starts, right=True).to(torch.int32)
    return sorted_pairs, tile_expert, padded_end[-1:].to(torch.int32)


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Tile height from the mean rows per expert (shapes only): decode steps route a few tokens
    to each expert, and a tall tile would be mostly padding."""
    mean_rows = num_pairs / num_experts
    return 16 if mean_rows <= 16 else 32 if mean_rows <= 32 else 64


def _tile_n_k(n: int, k: int, dot_fp32: bool, block_n: int | None, block_k: int | None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a [rows, k] x [k, n] product. The interpreter runs every program op
    by op in Python: there one tile covers as much of the product as it can (fewer programs and
    loop trips, each a numpy op). On a GPU, tiles that keep shared memory in bounds (fp32 tiles
    are twice the bytes)."""
    if _INTERPRET:
        fit_n, fit_k = (min(128, max(16, triton.next_power_of_2(size))) for size in (n, k))
    else:
        fit_n = fit_k = 32 if dot_fp32 else 64
    return block_n or fit_n, block_k or fit_k


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing_weights: torch.Tensor,
              experts: torch.Tensor, activation: str = "silu", *, block_n: int | None = None,
              block_k: int | None = None) -> torch.Tensor:
    """sum over k of routing_weights[t, k] * down_e(act(gate_e(x[t])) * up_e(x[t])), e = experts[t, k].

    x [tokens, H]; w13 [E, 2 * I, H] (gate rows, then up rows); w2 [E, H, I];
    routing_weights [tokens, top_k] (float32), experts [tokens, top_k] (ids < E) -> [tokens, H]
    in x's dtype. activation: a name from engine/layers/activation.py. block_n/block_k exist for
    tests (several tiles and loop trips on small shapes).
    """
    if activation not in _ACT_CODES:
        raise ValueError(f"fused_moe has no activation {activation!r}; it has {sorted(_ACT_CODES)}")
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} do not fit")
    top_k = experts.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    block_m = _block_m(num_pairs, num_experts)
    sorted_pairs, tile_expert, num_padded = align_to_experts(experts, num_experts, block_m)
    tiles = tile_expert.shape[0]
    dot_fp32 = _INTERPRET or x.dtype == torch.float32

    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    tile_n, tile_k = _tile_n_k(inter, hidden, dot_fp32, block_n, block_k)
    _gate_up_kernel[(tiles, triton.cdiv(inter, tile_n))](
        h, x, w13, sorted_pairs, tile_expert, num_padded,
        num_pairs, inter, hidden,
        *x.stride(), *w13.stride(), *h.stride(),
        TOP_K=top_k, ACT=_ACT_CODES[activation], DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_N=tile_n, BLOCK_K=tile_k, num_warps=4,
    )
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    tile_n, tile_k = _tile_n_k(hidden, inter, dot_fp32, block_n, block_k)
    _down_kernel[(tiles, triton.cdiv(hidden, tile_n))](
        out, h, w2, routing_weights.contiguous(), sorted_pairs, tile_expert, num_padded,
        num_pairs, hidden, inter,
        *h.stride(), *w2.stride(), *out.stride(),
        DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_N=tile_n, BLOCK_K=tile_k, num_warps=4,
    )
    return out.view(num_tokens, top_k, hidden).sum(dim=1)
