"""Mixture of experts: a router picks top_k experts per token; each expert is a gated MLP.

The experts' weights live stacked ([experts, 2 * I, H] for gate/up, [experts, H, I] for down),
and a step runs them grouped by expert: tokens are sorted by the expert they go to, each
expert multiplies its contiguous slice in one matmul, and the weighted outputs are summed back
per token. The Python loop is over experts (a few dozen), never over tokens. A backend whose ops
module has `fused_moe` (Triton: kernels/triton_moe.py) runs the experts in its kernels instead,
with no host loop and no host sync. Tensor parallel:
every rank holds every expert's slice of the intermediate dimension (like a dense MLP), and one
all-reduce sums the partial outputs.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import get_forward_context
from engine.layers.activation import gated_activation
from engine.layers.linear import check_shape, set_loader
from engine.parallel_state import ParallelState, rank_and_size, read_part


# A checkpoint's per-expert projection -> the stacked parameter and its part.
_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def expert_param(name: str) -> tuple[str, tuple[int, str]] | None:
    """("...experts.w13", (expert, "gate")) for "...experts.3.gate_proj.weight"; None otherwise."""
    match = _EXPERT_WEIGHT.search(name)
    if match is None:
        return None
    part = _PART[match.group(2)]
    stacked = "w2" if part == "down" else "w13"
    return f"{name[: match.start()]}.experts.{stacked}", (int(match.group(1)), part)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids) [tokens, top_k]: softmax over every expert in float32, the top_k
    kept (renormalized to sum 1 if asked), as transformers' Mixtral and Qwen MoE blocks do."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 act: str, parallel: ParallelState | None):
        super().__init__()
        rank, size = rank_and_size(parallel)
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.parallel = parallel
        self.full_intermediate, inter = intermediate_size, intermediate_size // size
        self.inter_start = rank * inter
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, inter))
        self.act_name, self.act = act, gated_activation(act)
        experts = range(num_experts)
        set_loader(self, "w13", self.load_w13, [(e, part) for e in experts for part in ("gate", "up")])
        set_loader(self, "w2", self.load_w2, [(e, "down") for e in experts])

    def load_w13(self, param: nn.Parameter, weight, shard_id) -> None:
        expert, part = shard_id
        inter = param.shape[1] // 2
        check_shape(weight, (self.full_intermediate, param.shape[2]))
        rows = param.data[expert].narrow(0, 0 if part == "gate" else inter, inter)
        rows.copy_(read_part(weight, 0, self.inter_start, inter))

    def load_w2(self, param: nn.Parameter, weight, shard_id) -> None:
        expert, _ = shard_id
        check_shape(weight, (param.shape[1], self.full_intermediate))
        param.data[expert].copy_(read_part(weight, 1, self.inter_start, param.shape[2]))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """x [tokens, H] -> [tokens, H]. reduce False leaves the tensor-parallel sum to the caller
        (who adds a shared expert's partial output first and reduces once)."""
        weights, experts = route(router_logits, self.top_k, self.renormalize)
        fused_moe = getattr(get_forward_context().backend.ops, "fused_moe", None)
        if fused_moe is not None:
            y = fused_moe(x, self.w13, self.w2, weights, experts, self.act_name)
        else:
            y = self.grouped_by_expert(x, weights, experts)
        if reduce and self.parallel is not None:
            self.parallel.all_reduce(y)
        return y

    def grouped_by_expert(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The torch path: one matmul pair per expert over its contiguous run of sorted rows."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // self.top_k
        grouped = x[token_of]
        out = torch.empty_like(grouped)
        start = 0
        for expert, n in enumerate(counts):
            if n:
                rows = grouped[start : start + n]
                h = self.act(F.linear(rows, self.w13[expert]))
                out[start : start + n] = F.linear(h, self.w2[expert])
                start += n
        out *= weights.flatten()[order].to(x.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, token_of, out)
