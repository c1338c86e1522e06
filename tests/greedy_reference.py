"""Greedy comparison against transformers, with the near-tie rule.

Where the engine and transformers pick different tokens, the difference is accepted only when
the two candidates' logits (transformers' own logits at that position) are within 1e-4
relative: float32 summation order can flip such a tie. The rest of that sequence is not
compared, since the two continuations no longer share a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEAR_TIE_RTOL = 1e-4


@dataclass
class Comparison:
    num_sequences: int = 0
    num_tokens_compared: int = 0
    near_ties: int = 0

    def __str__(self) -> str:
        return f"{self.num_sequences} sequences, {self.num_tokens_compared} tokens, {self.near_ties} near-ties"


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens (EOS ignored) and its raw logits at each generated position."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,  # run past EOS without banning it, as the engine's ignore_eos does
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[0, len(prompt_ids) :].tolist(), [step[0] for step in out.logits]


def compare_greedy(
    engine_tokens: list[int], hf_tokens: list[int], hf_logits: list[torch.Tensor], result: Comparison
) -> None:
    result.num_sequences += 1
    assert len(engine_tokens) == len(hf_tokens), (len(engine_tokens), len(hf_tokens))
    for pos, (ours, theirs) in enumerate(zip(engine_tokens, hf_tokens)):
        result.num_tokens_compared += 1
        if ours == theirs:
            continue
        logits = hf_logits[pos].float()
        a, b = float(logits[ours]), float(logits[theirs])
        assert abs(a - b) <= NEAR_TIE_RTOL * max(abs(a), abs(b)), (
            f"token {pos}: engine chose {ours} (logit {a}), transformers {theirs} (logit {b}); not a near-tie"
        )
        result.near_ties += 1
        return
