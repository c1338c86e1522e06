"""The token embedding and the LM head, split by vocabulary rows under tensor parallelism.

Rank r holds rows [r * rows, (r + 1) * rows) with rows = ceil(vocab_size / world_size); the
last rank's rows past vocab_size are padding, zero in both (so padded logits are 0, cut off
after the gather).

Quantized (EngineConfig.embedding_quantization, with `quantization` set), the LM head and a
table tied to it become int8 rows with one scale each: a lookup gathers the rows' codes and
scales them (exactly the rows of the dequantized table), and the tied head multiplies with the
same codes, so one copy serves both (under w8a8 or w4a8 projections, codes of the rows rotated as
w8a8 rotates, the head a w8a8 matmul, the lookup rotating its rows back). int8 even under int4: the
head's logits decide every token (llama.cpp's Q4_K_M keeps token_embd/output at 6-8 bits too);
for a 3B model with a 128k
vocabulary it halves the largest tensor (788 MB in bfloat16). An untied table is only gathered
from, never multiplied with, so it takes the projections' format (GroupedRows: int4 groups under
int4), and a GGUF's Q4_0/Q4_1/Q4_K/Q8_0 token_embd keeps its own codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import INT4_QUANTIZATIONS
from engine.layers.linear import Linear, check_shape, place_rows, set_loader
from engine.layers.packed_weight import PackedQuantizedWeight
from engine.layers.quant import (QuantizedWeight, int4_group_size, quantize_int4, quantize_int8, quantize_w8a8, rounds_activations,
                                 w8a8_fits)
from engine.layers.rotation import hadamard_block
from engine.parallel_state import ParallelState, rank_and_size, read_part

# float32 bytes quantized at a time: quantize_int8/int4 make several float32 passes over their
# input (1.5 GB each for a whole 128k x 3072 table); a chunk that stays in the core's cache takes
# 3x less CPU than the 100 MB chunks of 8192 such rows (int8, one thread: 1.5 s for a 3B model's
# table instead of 4.8), with the same codes.
_QUANTIZE_CHUNK_BYTES = 4 << 20
# Bytes of the table read from the checkpoint at a time (few enough reads, a small temporary).
_LOAD_CHUNK_BYTES = 4 << 20


def _chunk_rows(cols: int) -> int:
    return max(1, _QUANTIZE_CHUNK_BYTES // (4 * cols))


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState | None):
        rank, size = rank_and_size(parallel)
        rows = -(-vocab_size // size)
        # An uninitialised table: nn.Embedding's own random init on the meta device runs through
        # torch._refs, which imports torch._dynamo and triton (~150 MB resident, never used).
        super().__init__(rows, hidden_size, _weight=torch.empty(rows, hidden_size))
        self.parallel = parallel
        self.vocab_size, self.vocab_start = vocab_size, rank * rows
        self.real_rows = max(0, min(rows, vocab_size - self.vocab_start))
        self.register_module("quantized", None)  # tied: int8 codes [rows, hidden], a scale per row
        self.register_module("grouped", None)  # untied: GroupedRows
        self.tied_head: ParallelLMHead | None = None  # set by a head that shares the table
        self.file_codes: QuantizedWeight | None = None  # a GGUF token_embd's own codes
        set_loader(self, "weight", self.load_rows)

    def load_rows(self, param: nn.Parameter, weight, shard_id=None) -> None:
        check_shape(weight, (self.vocab_size, param.shape[1]))
        param.data[self.real_rows :].zero_()
        if isinstance(weight, QuantizedWeight):
            part = read_part(weight, 0, self.vocab_start, self.real_rows)
            if param is self.weight and self.tied_head is None:  # kept as it is if finalize quantizes
                self.file_codes = part
            param.data[: self.real_rows].copy_(part.dequantize())  # for a finalize that keeps or re-quantizes it
            return
        # In parts: a lazy table (model_files.TensorInFile, safetensors' slice) is read a part at
        # a time, so the load holds the parameter and one part, never a second whole table.
        step = max(1, _LOAD_CHUNK_BYTES // (param.element_size() * param.shape[1]))
        for start in range(0, self.real_rows, step):
            rows = min(step, self.real_rows - start)
            param.data[start : start + rows].copy_(read_part(weight, 0, self.vocab_start + start, rows))

    def finalize(self, quantization: str | None, projections: str | None = None, group_size: int = 32) -> str:
        """After loading: the table kept in dtype (quantization None), or tied, int8 rows
        ("int8"); untied, in the projections' format (a GGUF's own codes where it has them)."""
        file_codes, self.file_codes = self.file_codes, None
        if quantization is None:
            return "float"
        if quantization != "int8":
            raise ValueError(f"the embedding is stored as int8 rows or in dtype, not {quantization!r}")
        weight = self.weight.detach()
        if self.tied_head is not None:
            w8a8 = head_is_w8a8(projections, self.embedding_dim)
            self.quantized = PackedQuantizedWeight(int8_rows(weight, w8a8), weight.dtype, weight.device, w8a8)
            self.tied_head.share(self.quantized)
        else:
            if file_codes is None or self.real_rows != self.num_embeddings:  # (a padded rank re-quantizes)
                file_codes = quantize_table(weight, projections or "int8", group_size)
            self.grouped = GroupedRows(file_codes, weight.dtype)
        self.weight = None
        if self.grouped is None:
            return "w8a8" if self.quantized.w8a8 else "int8"
        if self.grouped.group_size == self.embedding_dim:
            return "int8"
        return f"int{self.grouped.bits} groups of {self.grouped.group_size}"

    def lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.grouped is not None:
            return self.grouped(token_ids)
        if self.quantized is None:
            return F.embedding(token_ids, self.weight)
        return self.quantized.embedding_rows(token_ids)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return self.lookup(token_ids)
        # Each rank embeds the ids in its rows (zeros for the rest); the all-reduce fills them in.
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        x = self.lookup(local.clamp(0, self.num_embeddings - 1))
        return self.parallel.all_reduce(x * mine[:, None].to(x.dtype))


class GroupedRows(nn.Module):
    """An embedding table no matmul reads, as buffers: codes (int8 [rows, cols], or int4 two per
    byte [rows, cols / 2], element 2j in the low nibble) and a scale (int4: and a zero) per group
    of group_size columns, in dtype. A lookup dequantizes only the rows it gathers."""

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.bits, self.group_size = q.bits, q.group_size
        codes = q.codes if q.bits == 8 else q.codes[:, 0::2] | (q.codes[:, 1::2] << 4)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", q.scale.to(dtype))
        self.register_buffer("zeros", None if q.zero is None else q.zero.to(dtype))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        codes = self.codes[token_ids]
        if self.bits == 4:
            codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)
        scale = self.scales[token_ids].repeat_interleave(self.group_size, dim=-1)
        if self.bits == 8:
            return codes.to(scale.dtype) * scale
        return (codes.to(scale.dtype) - 8) * scale + self.zeros[token_ids].repeat_interleave(self.group_size, dim=-1)


def quantize_table(weight: torch.Tensor, method: str, group_size: int) -> QuantizedWeight:
    """A gather-only table in `method`'s format: int4 groups (where a group divides the width),
    else int8 rows."""
    group = int4_group_size(weight.shape[1], group_size) if method in INT4_QUANTIZATIONS else None
    if group is None:
        return int8_rows(weight)
    step = _chunk_rows(weight.shape[1])
    parts = [quantize_int4(weight[i : i + step], group) for i in range(0, weight.shape[0], step)]
    return QuantizedWeight(4, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat([p.zero for p in parts]), group)


def head_is_w8a8(projections: str | None, width: int) -> bool:
    """Whether an int8 LM head (and a table tied to it) is w8a8: under w8a8 or w4a8 projections
    (whose inputs are rounded to int8 too), where w8a8's kernels take its width. Its rows rotated
    and its input rounded to int8 as theirs, it measured closer to float32 than int8 weight-only
    rows on the default model under w8a8, as close under w4a8, and at 16-64 rows takes 0.4x the
    time of int8_f32_linear's float32 FMAs (README)."""
    return rounds_activations(projections) and w8a8_fits(width)


def int8_rows(weight: torch.Tensor, w8a8: bool = False) -> QuantizedWeight:
    """quantize_int8 (one scale per row; w8a8: quantize_w8a8, of the rotated rows), a few
    hundred rows at a time so its float32 working copies stay in cache."""
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=weight.device)
    step = _chunk_rows(cols)
    for start in range(0, rows, step):
        q = (quantize_w8a8 if w8a8 else quantize_int8)(weight[start : start + step])
        codes[start : start + step], scale[start : start + step] = q.codes, q.scale
    return QuantizedWeight(8, codes, scale, None, cols, hadamard_block(cols) if w8a8 else 0)


class ParallelLMHead(Linear):
    """This rank's vocabulary rows of the output projection; tied, it is the embedding's weight
    (or, quantized, the embedding's int8 codes: one copy)."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool):
        super().__init__(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        object.__setattr__(self, "embedding", embedding)  # a reference, not a second submodule
        self.tied = tied
        if tied:
            self.weight = embedding.weight
            object.__setattr__(embedding, "tied_head", self)  # not a submodule of the embedding
        else:
            set_loader(self, "weight", embedding.load_rows)

    def finalize(self, quantization: str | None, group_size: int, pack: bool, projections: str | None = None) -> str:
        """quantization: the embedding's ("int8" or None), never the projections' int4. Under w8a8
        or w4a8 projections an int8 head is w8a8 (its rows rotated, its input rounded to int8)."""
        if self.tied:  # a packed copy would be a second copy of the embedding table
            if self.quantized is None:
                return "tied"
            return "tied w8a8" if self.quantized.w8a8 else "tied int8"
        if quantization == "int8":  # quantized in row chunks, then kept as is by Linear.finalize
            w8a8 = head_is_w8a8(projections, self.in_features)
            place_rows(self.weight, 0, int8_rows(self.weight.detach(), w8a8))
            quantization = "w8a8" if w8a8 else quantization
        elif quantization is not None:
            raise ValueError(f"the LM head is stored as int8 rows or in dtype, not {quantization!r}")
        return super().finalize(quantization, group_size, pack)

    def share(self, quantized: PackedQuantizedWeight) -> None:
        """Tied: multiply with the embedding's int8 codes; the float table is gone."""
        self.weight = None
        self.quantized = quantized

    def retie(self) -> None:
        """After the model moved (to_empty, a dtype cast), share the embedding's tensor again."""
        if self.tied:
            self.weight = self.embedding.weight
