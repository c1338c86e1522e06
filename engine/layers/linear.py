"""Projections that load their own shard: replicated, column-parallel (one output block or
several fused ones: q/k/v, gate/up), row-parallel.

Every parameter has a weight_loader(param, weight, shard_id) that takes the checkpoint tensor
(whole, or a lazy safetensors slice) and copies in this rank's part, so a model's load_weights
is only a name mapping. shard_id names the block of a fused projection ("q", 0, ...); None is
the whole checkpoint tensor (for Phi-3's qkv_proj that is all three blocks, fused).
"""

from __future__ import annotations

import functools
import logging
import sys

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quant import PackedQuantizedWeight, QuantizedWeight, amx_kernels, quantize_blocks
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


class Linear(nn.Linear):
    """nn.Linear whose weight, once loaded, is kept in exactly one layout: the one its matmul
    reads (finalize). That is int8/int4 codes (engine/layers/quant.py) when quantized; else on
    CPU, in bfloat16 where the CPU has AMX-BF16 or AVX512-BF16 (and K is a multiple of 32), the
    column-tile strips of kernels/csrc/amx_linear.cpp (AMX: 0.4-0.6x oneDNN's time at 1-64 rows)
    and bf16_linear.cpp (no AMX: see BF16_STRIPS_MAX_ROWS); else oneDNN's
    blocked layout (packed once at load: 1.2-2x faster than F.linear's BLAS call at 4-200 rows
    in float32, about 2x at any row count in bfloat16); else the float weight. The float weight
    is dropped after packing or quantizing."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("packed_weight", None)  # oneDNN's layout, or column strips (strips)
        self.register_module("quantized", None)
        self.strips = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantized is not None:
            y = self.quantized.forward(x)  # not __call__: its hook checks cost ~1 us x 200 calls a step
            return y if bias is None else y + bias
        if self.strips:
            return strips_linear(x, self.packed_weight, bias, self.out_features)
        if self.packed_weight is not None:
            rows = x.shape[0]
            padded = packed_rows(rows)
            if padded != rows:
                x = F.pad(x, (0, 0, 0, padded - rows))
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")
            return y if padded == rows else y[:rows]
        if bias is None and x.dtype == torch.bfloat16 and x.shape[0] <= AMX_FEW_ROWS:
            return few_rows_bfloat16(x, self.weight)
        return F.linear(x, self.weight, bias)

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
                                                       int8_activations=quantization == "w8a8")
                self.weight = None
                return quantization
            logger.info("%s: input width %d fits no %s layout; kept in float", type(self).__name__, self.in_features,
                        quantization)
        for row, part in parts.items():  # a quantized checkpoint block in a float layer: dequantized
            self.weight.data.narrow(0, row, part.shape[0]).copy_(part.dequantize())
        strips = pack and self.weight.dtype == torch.bfloat16 and self.in_features % 32 == 0
        ops = strips_ops() if strips and self.weight.device.type == "cpu" else None
        if ops is not None:
            self.packed_weight = ops.amx_linear_pack(self.weight.detach())
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


# Rows up to which a plain bfloat16 weight (the tied LM head) multiplies on AMX (kernels/csrc/
# gemv_ops.cpp): SmolLM2's 49152 x 576 head, one thread, A/B on a loaded AMX Xeon, vs torch.mv/mm
# (up to 16 rows) or F.linear: 1 row 8.9 vs 9.2 ms, 4 rows 12.5 vs 14.1, 16 rows 13.2 vs 18.1,
# 64 rows 23.7 vs 27.8; at 128 rows F.linear is faster (45.9 vs 50.9). Without AMX, bf16_mm_rows
# (AVX512-BF16) vs torch.mv/mm vs F.linear, two threads, loaded 2-vCPU Xeon (bench_limits.py
# --lm-head): 1 row 2.6 / 18.8 / 12.1 ms, 4 rows 4.9 / 15.4 / 13.3, 16 rows 15.5 / 19.5 / 25.5,
# 64 rows 61 / 74 / 76; at 128 rows even with F.linear (169 / 178 / 168 in an earlier run).
AMX_FEW_ROWS = 64


def few_rows_bfloat16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a few rows against a plain bfloat16 weight, reading the weight once: on
    AMX through brgemm with the weight as the streaming operand; else where the CPU has
    AVX512-BF16 through bf16_mm_rows' dot products (both kernels/csrc/gemv_ops.cpp); elsewhere up
    to 16 rows with the weight as the left operand of ATen's GEMV/GEMM, where F.linear took
    1.3-1.5x as long (one thread: 1 row 7.6 -> 5.0 ms, 2-16 rows 9.3-10.8 -> 6.9-8.7 ms)."""
    ops = amx_kernels() if x.device.type == "cpu" else None
    if ops is not None and weight.is_contiguous() and weight.shape[1] % 2 == 0:
        return ops.bf16_mm_amx(x if x.stride(-1) == 1 else x.contiguous(), weight)
    ops = bf16_rows_ops() if x.device.type == "cpu" else None
    if ops is not None and weight.is_contiguous():
        return ops.bf16_mm_rows(x, weight)
    if x.shape[0] == 1:
        return torch.mv(weight, x[0]).unsqueeze(0)
    if x.shape[0] <= 16:
        return torch.mm(weight, x.T).T.contiguous()
    return F.linear(x, weight)


@functools.cache
def bf16_rows_ops():
    """torch.ops.bento_llm with bf16_mm_rows where the CPU has AVX512-BF16, else None."""
    try:
        import kernels.cpu_ops  # noqa: F401  (builds and registers the ops)
    except ImportError:
        return None
    return torch.ops.bento_llm if torch.ops.bento_llm.bf16_mm_rows_supported() else None


# Input rows up to which the AMX strips multiply in place; more rows (prefill chunks) unpack them
# into a temporary plain weight for F.linear, whose oneDNN blocking is faster there (the hand loop
# reaches ~0.7x oneDNN's FLOP/s at 2000 rows; blocking it further along K, the input copied into
# tiles first, or L1 prefetch of the next rows did not close that). Measured with the unpack
# vectorized (one thread, thread CPU time on a loaded 2-vCPU AMX Xeon, A/B in one process, min of
# 11 passes), the default model's four projections of a layer, AMX / (unpack + F.linear) /
# F.linear on a plain weight: 512 rows 11.6 / 15.3 / 12.9 ms, 768 rows 7.75 / 7.93 / 5.95 (and
# 15.1 / 16.3 / 14.1 in a noisier pass), 896 rows 18.4 / 18.7 / 16.5, 1024 rows 20.4 / 19.8 / 17.5,
# 2000 rows 21.8 / 17.8 / 15.2 (the unpack itself ~0.5 ms a layer, scalar it was ~2).
AMX_STRIPS_MAX_ROWS = 768


# The same strips without AMX (kernels/csrc/bf16_linear.cpp, AVX512-BF16) multiply in place at
# every row count: against oneDNN's packed bfloat16 matmul (which unpack + F.linear reaches at
# best) on the default model's projections, one thread, A/B in one process on this 2-vCPU
# Sapphire Rapids without AMX: 0.53-0.67x its time at 1 row, 0.48-0.64 at 8, 0.68-0.75 at 16,
# 0.78-0.88 at 64, 0.95-0.98 at 256, 0.90-0.99 at 2000 (both ~80 GFLOP/s there).
BF16_STRIPS_MAX_ROWS = sys.maxsize


@functools.cache
def amx_linear_ops():
    """torch.ops.bento_llm with kernels/csrc/amx_linear.cpp where the CPU has AMX-BF16 tiles, else None."""
    ops = amx_kernels()
    return ops if ops is not None and ops.amx_linear_supported() else None


@functools.cache
def bf16_linear_ops():
    """torch.ops.bento_llm with kernels/csrc/bf16_linear.cpp where the CPU has AVX512-BF16, else None."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    try:
        import kernels.cpu_ops  # noqa: F401  (builds and registers the ops)
    except ImportError:
        return None
    return torch.ops.bento_llm if torch.ops.bento_llm.bf16_linear_supported() else None


@functools.cache
def strips_ops():
    """The ops that multiply column strips here: AMX's (amx_linear), else AVX512-BF16's, else None."""
    amx = amx_linear_ops()
    return amx if amx is not None else bf16_linear_ops()


def strips_linear(x: torch.Tensor, strips: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """x @ W.T + bias for W kept as column strips: in place up to AMX_STRIPS_MAX_ROWS rows on AMX
    (BF16_STRIPS_MAX_ROWS without), else through a plain copy of W made for this call (freed after it)."""
    amx = amx_linear_ops()
    if x.dtype == torch.bfloat16 and x.shape[0] <= (BF16_STRIPS_MAX_ROWS if amx is None else AMX_STRIPS_MAX_ROWS):
        x = x if x.stride(-1) == 1 else x.contiguous()
        if amx is not None:
            return amx.amx_linear(x, strips, bias, out_features)
        return strips_ops().bf16_linear(x, strips, bias, out_features)
    return F.linear(x, strips_ops().amx_linear_unpack(strips, out_features), bias)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return self.project(x, self.bias)
        y = self.parallel.all_reduce(self.project(x, None))
        return y if self.bias is None else y + self.bias
