"""Mixture of experts: a router picks top_k experts per token; each expert is a gated MLP.

The experts' weights live stacked ([experts, 2 * I, H] for gate/up, [experts, H, I] for down),
and a step runs them grouped by expert: tokens are sorted by the expert they go to, each
expert multiplies its contiguous slice in one matmul, and the weighted outputs are summed back
per token. The Python loop is over experts (a few dozen), never over tokens. A backend whose ops
module has `fused_moe` (Triton: kernels/triton_moe.py) runs the experts in its kernels instead,
with no host loop and no host sync. Tensor parallel:
every rank holds every expert's slice of the intermediate dimension (like a dense MLP), and one
all-reduce sums the partial outputs.

Quantized (quantization int8/int4/w8a8, CPU): each expert's gate+up and down are one
PackedQuantizedWeight each (engine/layers/packed_weight.py, the kernels the dense projections use),
quantized as that expert's tensors arrive, so a load holds one expert's float weight at a time;
the float stacks are never filled (they stay on "meta") and are dropped once every expert is in.
A GGUF's Q4_0/Q4_1/Q4_K/Q8_0 expert blocks arrive as QuantizedWeights and keep their codes.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import get_forward_context
from engine.layers.activation import gated_activation
from engine.layers.linear import check_shape, set_loader
from engine.layers.packed_weight import PackedQuantizedWeight
from engine.layers.quant import QuantizedWeight, int4_group_size, quantize_blocks, rounds_activations
from engine.parallel_state import ParallelState, rank_and_size, read_all, read_part

logger = logging.getLogger(__name__)


# A checkpoint's per-expert projection -> the stacked parameter and its part.
_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
# Every expert in one tensor, as transformers (>= 5) names them, e.g. in a GGUF's converted copy:
# gate_up_proj [experts, 2 * I, H] (gate rows, then up rows), down_proj [experts, H, I].
_STACKED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def expert_param(name: str) -> tuple[str, tuple[int, str] | None] | None:
    """("...experts.w13", (expert, "gate")) for "...experts.3.gate_proj.weight"; ("...experts.w13",
    None) for a stacked "...experts.gate_up_proj" (every expert); None for any other name."""
    stacked = _STACKED_EXPERTS.search(name)
    if stacked is not None:
        return f"{name[: stacked.start()]}.experts.{'w13' if stacked.group(1) == 'gate_up_proj' else 'w2'}", None
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
        # Quantized experts (see quantize_at_load): [expert] -> gate+up, down; None while float.
        self.register_module("quantized_w13", None)
        self.register_module("quantized_w2", None)
        self.quantize_as: tuple[str, int] | None = None
        self._held: dict[tuple[int, str], dict[str, object]] = {}  # an expert's blocks until all are in
        self._packed: dict[tuple[int, str], PackedQuantizedWeight] = {}
        experts = range(num_experts)
        set_loader(self, "w13", self.load_w13, [(e, part) for e in experts for part in ("gate", "up")])
        set_loader(self, "w2", self.load_w2, [(e, "down") for e in experts])

    def quantize_at_load(self, method: str | None, group_size: int, attention_backend: str) -> None:
        """Before loading: under `method`, experts are quantized as they load (no float stack is
        ever filled); a width no layout takes leaves them float, logged, as Linear does."""
        if method is None:
            return
        device = self.w13.device
        if attention_backend == "triton" or device.type != "cpu":
            raise ValueError(
                f"quantization={method!r} keeps MoE experts quantized on CPU only (the 'cpu' and 'torch' "
                f"attention backends); the Triton fused-MoE kernel multiplies float experts (here: "
                f"attention_backend={attention_backend!r} on {device.type}): set quantization=None")
        hidden, inter = self.w13.shape[2], self.w2.shape[2]
        if method == "w8a8":
            fits = hidden % 4 == 0 and inter % 4 == 0
        else:
            fits = method == "int8" or (int4_group_size(hidden, group_size) and int4_group_size(inter, group_size))
        if not fits:
            logger.info("MoE experts: widths %d/%d fit no %s layout; kept in float", hidden, inter, method)
            return
        self.quantize_as = (method, group_size)
        self.w13 = nn.Parameter(torch.empty(self.w13.shape, dtype=self.w13.dtype, device="meta"), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.w2.shape, dtype=self.w2.dtype, device="meta"), requires_grad=False)
        self._target = (self.w13.dtype, device)

    def load_w13(self, param: nn.Parameter, weight, shard_id) -> None:
        inter, full = param.shape[1] // 2, self.full_intermediate
        if shard_id is None:  # every expert stacked: gate rows, then up rows
            stacked = read_all(weight)
            check_shape(stacked, (self.num_experts, 2 * full, param.shape[2]))
            for expert, rows in enumerate(stacked):
                self.load_w13(param, rows[:full], (expert, "gate"))
                self.load_w13(param, rows[full:], (expert, "up"))
            return
        expert, part = shard_id
        check_shape(weight, (full, param.shape[2]))
        block = read_part(weight, 0, self.inter_start, inter)
        if self.quantize_as is not None:
            self._hold(expert, part, block)
        else:
            param.data[expert].narrow(0, 0 if part == "gate" else inter, inter).copy_(_as_float(block))

    def load_w2(self, param: nn.Parameter, weight, shard_id) -> None:
        if shard_id is None:  # every expert stacked
            stacked = read_all(weight)
            check_shape(stacked, (self.num_experts, param.shape[1], self.full_intermediate))
            for expert, columns in enumerate(stacked):
                self.load_w2(param, columns, (expert, "down"))
            return
        expert, _ = shard_id
        check_shape(weight, (param.shape[1], self.full_intermediate))
        block = read_part(weight, 1, self.inter_start, param.shape[2])
        if self.quantize_as is not None:
            self._hold(expert, "down", block)
        else:
            param.data[expert].copy_(_as_float(block))

    def _hold(self, expert: int, part: str, block) -> None:
        """Keep an expert's block until its projection is complete (gate and up fuse into one
        matmul), then quantize and pack it: the float blocks go."""
        projection = "w2" if part == "down" else "w13"
        held = self._held.setdefault((expert, projection), {})
        held[part] = block
        order = ("down",) if projection == "w2" else ("gate", "up")
        if all(p in held for p in order):
            del self._held[(expert, projection)]
            method, group_size = self.quantize_as
            q = quantize_blocks([held[p] for p in order], method, group_size)
            if q is None:  # quantize_at_load checked the widths
                raise ValueError(f"expert {expert}'s {projection} fits no {method} layout")
            self._packed[(expert, projection)] = PackedQuantizedWeight(q, *self._target,
                                                                       int8_activations=rounds_activations(method))

    def finalize(self) -> str:
        """After loading: the packed experts replace the (never filled) float stacks."""
        if self.quantize_as is None:
            return "float experts"
        experts = range(self.num_experts)
        self.quantized_w13 = nn.ModuleList(self._packed.pop((e, "w13")) for e in experts)
        self.quantized_w2 = nn.ModuleList(self._packed.pop((e, "w2")) for e in experts)
        self.w13 = self.w2 = None
        return f"{self.quantize_as[0]} experts"

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
                if self.quantized_w13 is not None:
                    h = self.act(self.quantized_w13[expert](rows))
                    out[start : start + n] = self.quantized_w2[expert](h)
                else:
                    h = self.act(F.linear(rows, self.w13[expert]))
                    out[start : start + n] = F.linear(h, self.w2[expert])
                start += n
        out *= weights.flatten()[order].to(x.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, token_of, out)


def _as_float(block) -> torch.Tensor:
    """A GGUF block loading into float experts (quantization off) is dequantized."""
    return block.dequantize() if isinstance(block, QuantizedWeight) else block
