"""From final hidden states to logits over the whole vocabulary: in the LM head's dtype (a
greedy batch's argmax reads bfloat16 logits once, the sampler converts what it processes), in
float32 where they are scaled, capped or gathered across ranks."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.embedding import ParallelLMHead
from engine.parallel_state import ParallelState


class LogitsProcessor(nn.Module):
    """scale multiplies the logits (Granite's 1 / logits_scaling); soft_cap is Gemma's final
    cap * tanh(logits / cap). Tensor parallel: rank 0 gets every rank's vocabulary rows, the
    padding cut off; the other ranks get None."""

    def __init__(self, vocab_size: int, parallel: ParallelState | None, scale: float = 1.0, soft_cap: float | None = None):
        super().__init__()
        self.vocab_size, self.parallel = vocab_size, parallel
        self.scale, self.soft_cap = scale, soft_cap

    def forward(self, lm_head: ParallelLMHead, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = lm_head(hidden)
        if self.parallel is not None or self.scale != 1.0 or self.soft_cap is not None:
            logits = logits.float()
        if self.parallel is not None:
            logits = self.parallel.gather_to_first(logits)
            if logits is None:
                return None
            logits = logits[:, : self.vocab_size]
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits
