"""Projections that load their own shard: replicated, column-parallel (one output block or
several fused ones: q/k/v, gate/up), row-parallel.

Every parameter has a weight_loader(param, weight, shard_id) that takes the checkpoint tensor
(whole, or a lazy safetensors slice) and copies in this rank's part, so a model's load_weights
is only a name mapping. shard_id names the block of a fused projection ("q", 0, ...); None is
the whole checkpoint tensor (for Phi-3's qkv_proj that is all three blocks, fused).
"""

from __future__ import annotations

import logging

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear_kernels import (AMX_FEW_ROWS, few_rows_bfloat16, few_rows_float32, pack_strips, packed_rows,
                                          strips_kernel_call, strips_linear)
from engine.layers.packed_weight import PackedQuantizedWeight
from engine.layers.quant import QuantizedWeight, quantize_blocks, rounds_activations
from engine.layers.quant_kernels import quantized_kernel_call
from engine.layers.step_module import StepModule
from engine.parallel_state import ParallelState, kv_head_range, rank_and_size, read_all, read_part, weight_shape

logger = logging.getLogger(__name__)


def check_shape(weight, expected: tuple[int, ...]) -> None:
    if weight_shape(weight) != tuple(expected):
        raise ValueError(f"has shape {weight_shape(weight)}, the config implies {tuple(expected)}")


def load_whole(param: nn.Parameter, weight, shard_id=None) -> None:
    """The default loader: the parameter is the checkpoint tensor, on every rank."""
    check_shape(weight, param.shape)
    place_rows(param, 0, read_all(weight))


def place_rows(param: nn.Parameter, row: int, part) -> None:
    """Copy a float part into the parameter's rows from `row` on; an already quantized part
    (a GGUF block) is kept aside, whole, for the module's finalize (it never becomes float)."""
    if isinstance(part, QuantizedWeight):
        param.__dict__.setdefault("quantized_parts", {})[row] = part
    else:
        param.data.narrow(0, row, part.shape[0]).copy_(part)


def set_loader(module: nn.Module, name: str, loader, shard_ids=(None,)) -> None:
    """How module.<name> loads (kept on the module: moving a model replaces its Parameter
    objects), and the shard ids that must all be loaded for it to be complete."""
    if "weight_loaders" not in module.__dict__:
        module.weight_loaders = {}
    module.weight_loaders[name] = (loader, tuple(shard_ids))


def loader_of(module: nn.Module, name: str):
    return module.__dict__.get("weight_loaders", {}).get(name, (load_whole, (None,)))


class Linear(StepModule, nn.Linear):
    """nn.Linear whose weight, once loaded, is kept in exactly one layout: the one its matmul
    reads (finalize). That is int8/int4 codes (engine/layers/packed_weight.py) when quantized;
    else on CPU, in bfloat16 where the CPU has AMX-BF16 or AVX512-BF16 (and K is a multiple of 32), the
    column-tile strips of kernels/csrc/amx_linear.cpp (AMX: 0.4-0.6x oneDNN's time at 1-64 rows)
    and bf16_linear.cpp (no AMX: see BF16_STRIPS_MAX_ROWS); in float32 on any AVX-512 CPU,
    f32_linear.cpp's strips (0.6-0.75x oneDNN's time at 1 row, even from 8); else oneDNN's
    blocked layout (packed once at load: 1.2-2x faster than F.linear's BLAS call at 4-200 rows
    in float32, about 2x at any row count in bfloat16); else the float weight. The float weight
    is dropped after packing or quantizing.

    Called as a StepModule (no hooks: four calls a layer), and project reads its weight from the
    module's own dicts rather than through nn.Module.__getattr__: together ~3.5 of the ~7.5 us a
    1-row projection took from Python (bench: one process, a small serial weight)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("packed_weight", None)  # oneDNN's layout, or column strips (strips)
        self.register_module("quantized", None)
        self.strips = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self._parameters["bias"])

    def project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.strips:  # a plain attribute; strips and quantized exclude each other
            return strips_linear(x, self._buffers["packed_weight"], bias, self.out_features)
        quantized = self._modules["quantized"]
        if quantized is not None:
            y = quantized.forward(x)  # not __call__: its hook checks cost ~1 us x 200 calls a step
            return y if bias is None else y + bias
        if self.packed_weight is not None:
            rows = x.shape[0]
            padded = packed_rows(rows)
            if padded != rows:
                x = F.pad(x, (0, 0, 0, padded - rows))
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")
            return y if padded == rows else y[:rows]
        # The few-row kernels are the CPU's (measured there); on a GPU they were a transposed
        # product and a copy per projection (an H200, bench/RESULTS.md 2026-12-04): cuBLAS via F.linear.
        if bias is None and x.shape[0] <= AMX_FEW_ROWS and x.device.type == "cpu":
            if x.dtype == torch.bfloat16:
                return few_rows_bfloat16(x, self.weight)
            if x.dtype == torch.float32:
                return few_rows_float32(x, self.weight)
        return F.linear(x, self.weight, bias)

    def kernel_call(self, rows: int) -> tuple[str, list, list[int]] | None:
        """(op name, tensor arguments, int arguments after the input) where project() is that one
        registered op for `rows` bfloat16 input rows (kernels/csrc/step_ops.cpp's decoder_layer calls
        it so), else None."""
        if self.strips:
            return strips_kernel_call(rows, self._buffers["packed_weight"], self._parameters["bias"], self.out_features)
        quantized = self._modules["quantized"]
        if quantized is None or self._parameters["bias"] is not None:
            return None
        return quantized_kernel_call(quantized, rows)

    def row_blocks(self) -> list[tuple[int, int]]:
        """(first row, rows) of each checkpoint tensor this weight holds (fused: several)."""
        return [(0, self.out_features)]

    def finalize(self, quantization: str | None, group_size: int, pack: bool) -> str:
        """After loading: the weight into its one layout; returns which ("int4", "int8",
        "packed", "float")."""
        parts = self.weight.__dict__.pop("quantized_parts", {})
        if quantization is not None:
            q = self._quantize(parts, quantization, group_size)
            if q is not None:
                self.quantized = PackedQuantizedWeight(q, self.weight.dtype, self.weight.device,
                                                       int8_activations=rounds_activations(quantization))
                self.weight = None
                return quantization
            logger.info("%s: input width %d fits no %s layout; kept in float", type(self).__name__, self.in_features,
                        quantization)
        for row, part in parts.items():  # a quantized checkpoint block in a float layer: dequantized
            self.weight.data.narrow(0, row, part.shape[0]).copy_(part.dequantize())
        strips = pack_strips(self.weight.detach()) if pack else None
        if strips is not None:
            self.packed_weight = strips
            self.strips = True
            self.weight = None
            return "strips"
        if pack:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self.weight = None
            return "packed"
        return "float"

    def _quantize(self, parts: dict, method: str, group_size: int) -> QuantizedWeight | None:
        # Each checkpoint block: the file's quantized one where there is one, else its float rows.
        blocks = [parts.get(row, self.weight.data.narrow(0, row, rows)) for row, rows in self.row_blocks()]
        return quantize_blocks(blocks, method, group_size)


@dataclass(frozen=True)
class OutputBlock:
    """One block of a column-parallel output: the checkpoint tensor of full_rows rows, of which
    rows [start, start + rows) are this rank's."""

    shard_id: object
    full_rows: int
    start: int
    rows: int


class ColumnParallelLinear(Linear):
    """Output features split across ranks (no collective: the next row-parallel layer sums).
    Several blocks fuse projections that share an input into one matmul."""

    def __init__(self, in_features: int, blocks: list[OutputBlock], bias: bool):
        super().__init__(in_features, sum(b.rows for b in blocks), bias=bias)
        self.blocks = blocks
        ids = [b.shard_id for b in blocks]
        for name, _ in self.named_parameters(recurse=False):
            set_loader(self, name, self.load_block, ids)

    @classmethod
    def split(cls, in_features: int, out_features: list[int], bias: bool, parallel: ParallelState | None):
        """Blocks of the given full sizes (shard ids 0, 1, ...; one block: None), each split evenly."""
        rank, size = rank_and_size(parallel)
        ids = [None] if len(out_features) == 1 else range(len(out_features))
        blocks = [OutputBlock(i, n, rank * (n // size), n // size) for i, n in zip(ids, out_features)]
        return cls(in_features, blocks, bias)

    @classmethod
    def qkv(cls, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, parallel):
        rank, size = rank_and_size(parallel)
        heads = num_heads // size
        kv_start, kv_heads = kv_head_range(num_kv_heads, rank, size)
        q = OutputBlock("q", num_heads * head_dim, rank * heads * head_dim, heads * head_dim)
        k = OutputBlock("k", num_kv_heads * head_dim, kv_start * head_dim, kv_heads * head_dim)
        return cls(hidden, [q, k, dataclasses.replace(k, shard_id="v")], bias)

    def load_block(self, param: nn.Parameter, weight, shard_id) -> None:
        trailing = tuple(param.shape[1:])
        if shard_id is None and len(self.blocks) > 1:  # one checkpoint tensor holding every block
            check_shape(weight, (sum(b.full_rows for b in self.blocks), *trailing))
            full_offset = 0
            for block in self.blocks:
                self._copy(param, block, weight, full_offset)
                full_offset += block.full_rows
            return
        block = next(b for b in self.blocks if b.shard_id == shard_id)
        check_shape(weight, (block.full_rows, *trailing))
        self._copy(param, block, weight, 0)

    def _copy(self, param: nn.Parameter, block: OutputBlock, weight, full_offset: int) -> None:
        local_offset = 0
        for b in self.blocks:
            if b is block:
                break
            local_offset += b.rows
        place_rows(param, local_offset, read_part(weight, 0, full_offset + block.start, block.rows))

    def row_blocks(self) -> list[tuple[int, int]]:
        starts = [0]
        for b in self.blocks:
            starts.append(starts[-1] + b.rows)
        return [(start, b.rows) for start, b in zip(starts, self.blocks)]


class RowParallelLinear(Linear):
    """Input features split across ranks: each computes a partial product, an all-reduce sums
    them, and the bias (whole on every rank) is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelState | None):
        rank, size = rank_and_size(parallel)
        super().__init__(in_features // size, out_features, bias=bias)
        self.parallel = parallel
        self.in_start, self.full_in = rank * (in_features // size), in_features
        set_loader(self, "weight", self.load_columns)

    def load_columns(self, param: nn.Parameter, weight, shard_id=None) -> None:
        check_shape(weight, (param.shape[0], self.full_in))
        place_rows(param, 0, read_part(weight, 1, self.in_start, param.shape[1]))

    def kernel_call(self, rows: int) -> tuple[str, list, list[int]] | None:
        return super().kernel_call(rows) if self.parallel is None else None  # the all-reduce is Python's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return self.project(x, self.bias)
        y = self.parallel.all_reduce(self.project(x, None))
        return y if self.bias is None else y + self.bias
