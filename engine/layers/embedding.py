"""The token embedding and the LM head, split by vocabulary rows under tensor parallelism.

Rank r holds rows [r * rows, (r + 1) * rows) with rows = ceil(vocab_size / world_size); the
last rank's rows past vocab_size are padding, zero in both (so padded logits are 0, cut off
after the gather).

Quantized (EngineConfig.embedding_quantization, with `quantization` set), the table becomes
int8 rows with one scale each: a lookup gathers the rows' codes and scales them (exactly the
rows of the dequantized table), and a tied LM head multiplies with the same codes, so one copy
serves both. int8 even under int4: the head's logits decide every token (llama.cpp's Q4_K_M
keeps token_embd/output at 6-8 bits too); for a 3B model with a 128k vocabulary it halves the
largest tensor (788 MB in bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import Linear, check_shape, place_rows, set_loader
from engine.layers.quant import PackedQuantizedWeight, QuantizedWeight, quantize_int8
from engine.parallel_state import ParallelState, rank_and_size, read_part

# Rows quantized at a time: quantize_int8 works in float32, 1.5 GB for a whole 128k x 3072 table.
_QUANTIZE_ROWS = 8192


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState | None):
        rank, size = rank_and_size(parallel)
        rows = -(-vocab_size // size)
        super().__init__(rows, hidden_size)
        self.parallel = parallel
        self.vocab_size, self.vocab_start = vocab_size, rank * rows
        self.real_rows = max(0, min(rows, vocab_size - self.vocab_start))
        self.register_module("quantized", None)  # int8 codes [rows, hidden] and a scale per row
        self.tied_head: ParallelLMHead | None = None  # set by a head that shares the table
        set_loader(self, "weight", self.load_rows)

    def load_rows(self, param: nn.Parameter, weight, shard_id=None) -> None:
        check_shape(weight, (self.vocab_size, param.shape[1]))
        part = read_part(weight, 0, self.vocab_start, self.real_rows)
        if isinstance(part, QuantizedWeight):  # a GGUF tensor's blocks: their values, re-quantized by finalize
            part = part.dequantize()
        param.data[self.real_rows :].zero_()
        param.data[: self.real_rows].copy_(part)

    def finalize(self, quantization: str | None) -> str:
        """After loading: the table as int8 rows ("int8"), or kept in dtype (None)."""
        if quantization is None:
            return "float"
        if quantization != "int8":
            raise ValueError(f"the embedding is stored as int8 rows or in dtype, not {quantization!r}")
        self.quantized = PackedQuantizedWeight(int8_rows(self.weight.detach()), self.weight.dtype, self.weight.device)
        self.weight = None
        if self.tied_head is not None:
            self.tied_head.share(self.quantized)
        return "int8"

    def lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return F.embedding(token_ids, self.weight)
        codes, scales = self.quantized.qweight, self.quantized.scales
        return codes[token_ids].to(scales.dtype) * scales[token_ids, None]

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return self.lookup(token_ids)
        # Each rank embeds the ids in its rows (zeros for the rest); the all-reduce fills them in.
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        x = self.lookup(local.clamp(0, self.num_embeddings - 1))
        return self.parallel.all_reduce(x * mine[:, None].to(x.dtype))


def int8_rows(weight: torch.Tensor) -> QuantizedWeight:
    """quantize_int8 (one scale per row), a few thousand rows at a time so its float32 working
    copy stays small."""
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, _QUANTIZE_ROWS):
        q = quantize_int8(weight[start : start + _QUANTIZE_ROWS])
        codes[start : start + _QUANTIZE_ROWS], scale[start : start + _QUANTIZE_ROWS] = q.codes, q.scale
    return QuantizedWeight(8, codes, scale, None, cols)


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

    def finalize(self, quantization: str | None, group_size: int, pack: bool) -> str:
        """quantization: the embedding's ("int8" or None), never the projections' int4."""
        if self.tied:  # a packed copy would be a second copy of the embedding table
            return "tied int8" if self.quantized is not None else "tied"
        if quantization == "int8":  # quantized in row chunks, then kept as is by Linear.finalize
            place_rows(self.weight, 0, int8_rows(self.weight.detach()))
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
