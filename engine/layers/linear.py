"""Projections that load their own shard: replicated, column-parallel (one output block or
several fused ones: q/k/v, gate/up), row-parallel.

Every parameter has a weight_loader(param, weight, shard_id) that takes the checkpoint tensor
(whole, or a lazy safetensors slice) and copies in this rank's part, so a model's load_weights
is only a name mapping. shard_id names the block of a fused projection ("q", 0, ...); None is
the whole checkpoint tensor (for Phi-3's qkv_proj that is all three blocks, fused).
"""

from __future__ import annotations

import functools

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel_state import ParallelState, kv_head_range, rank_and_size, read_all, read_part, weight_shape


def check_shape(weight, expected: tuple[int, ...]) -> None:
    if weight_shape(weight) != tuple(expected):
        raise ValueError(f"has shape {weight_shape(weight)}, the config implies {tuple(expected)}")


def load_whole(param: nn.Parameter, weight, shard_id=None) -> None:
    """The default loader: the parameter is the checkpoint tensor, on every rank."""
    check_shape(weight, param.shape)
    param.data.copy_(read_all(weight))


def set_loader(module: nn.Module, name: str, loader, shard_ids=(None,)) -> None:
    """How module.<name> loads (kept on the module: moving a model replaces its Parameter
    objects), and the shard ids that must all be loaded for it to be complete."""
    if "weight_loaders" not in module.__dict__:
        module.weight_loaders = {}
    module.weight_loaders[name] = (loader, tuple(shard_ids))


def loader_of(module: nn.Module, name: str):
    return module.__dict__.get("weight_loaders", {}).get(name, (load_whole, (None,)))


class Linear(nn.Linear):
    """nn.Linear that on CPU can also hold its weight packed, once at load, into oneDNN's
    blocked layout (pack_for_cpu). Measured on a 2-core AVX-512 Xeon, float32: matmuls of 4-200
    rows (decode batches) run 1.2-2x faster through the packed weight than through F.linear's
    BLAS call, but 1-3 rows (a lone decode) run up to 2x slower; so both copies are kept and the
    row count picks one. bfloat16 runs about 2x faster packed at any row count, 1 included."""

    packed_weight: torch.Tensor | None = None
    min_packed_rows = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_weight is None or x.shape[0] < self.min_packed_rows:
            return F.linear(x, self.weight, bias)
        rows = x.shape[0]
        padded = packed_rows(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")[:rows]

    def pack_for_cpu(self) -> None:
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self.min_packed_rows = 4 if self.weight.dtype == torch.float32 else 1


def packed_rows(rows: int) -> int:
    """The row count a packed matmul runs at. oneDNN builds a kernel for each input row count and
    keeps it for the life of the process (measured on an AMX Xeon: ~0.3 MB of heap per count and
    weight shape, not bounded by ONEDNN_PRIMITIVE_CACHE_CAPACITY), so a server that met every
    token count up to max_num_batched_tokens grew by gigabytes (the soak's rising RSS). From 64
    rows up, counts round up to 8 steps per power of two (at most 12.5% more rows, where the
    matmul's cost is in its rows): about 100 counts per weight shape for 2048 tokens."""
    if rows <= 64:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def can_pack_for_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and (dtype != torch.bfloat16 or _onednn_packs_bfloat16())
    )


@functools.cache
def _onednn_packs_bfloat16() -> bool:
    """oneDNN packs bfloat16 weights only on CPUs with AVX512-BW or AVX-NE-CONVERT (an AVX2-only
    CPU raises "bf16 path needs the cpu support ..." at the reorder); there F.linear runs them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op: may go away; probe the reorder itself
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=torch.bfloat16), None)
            return True
        except RuntimeError:
            return False


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
        param.data.narrow(0, local_offset, block.rows).copy_(read_part(weight, 0, full_offset + block.start, block.rows))


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
        param.data.copy_(read_part(weight, 1, self.in_start, param.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return self.project(x, self.bias)
        y = self.parallel.all_reduce(self.project(x, None))
        return y if self.bias is None else y + self.bias
