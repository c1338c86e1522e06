"""The token embedding and the LM head, split by vocabulary rows under tensor parallelism.

Rank r holds rows [r * rows, (r + 1) * rows) with rows = ceil(vocab_size / world_size); the
last rank's rows past vocab_size are padding, zero in both (so padded logits are 0, cut off
after the gather)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear, check_shape, set_loader
from engine.parallel_state import ParallelState, rank_and_size, read_part


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState | None):
        rank, size = rank_and_size(parallel)
        rows = -(-vocab_size // size)
        super().__init__(rows, hidden_size)
        self.parallel = parallel
        self.vocab_size, self.vocab_start = vocab_size, rank * rows
        self.real_rows = max(0, min(rows, vocab_size - self.vocab_start))
        set_loader(self, "weight", self.load_rows)

    def load_rows(self, param: nn.Parameter, weight, shard_id=None) -> None:
        check_shape(weight, (self.vocab_size, param.shape[1]))
        param.data[self.real_rows :].zero_()
        param.data[: self.real_rows].copy_(read_part(weight, 0, self.vocab_start, self.real_rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return super().forward(token_ids)
        # Each rank embeds the ids in its rows (zeros for the rest); the all-reduce fills them in.
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        x = super().forward(local.clamp(0, self.num_embeddings - 1)) * mine[:, None].to(self.weight.dtype)
        return self.parallel.all_reduce(x)


class ParallelLMHead(Linear):
    """This rank's vocabulary rows of the output projection; tied, it is the embedding's weight."""

    quantizable = False  # its logits decide every token; the embedding stays in dtype too

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool):
        super().__init__(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        object.__setattr__(self, "embedding", embedding)  # a reference, not a second submodule
        self.tied = tied
        if tied:
            self.weight = embedding.weight
        else:
            set_loader(self, "weight", embedding.load_rows)

    def finalize(self, quantization: str | None, group_size: int, pack: bool) -> str:
        if self.tied:  # a packed copy would be a second copy of the embedding table
            return "tied"
        return super().finalize(quantization, group_size, pack)

    def retie(self) -> None:
        """After the model moved (to_empty, a dtype cast), share the embedding's tensor again."""
        if self.tied:
            self.weight = self.embedding.weight
