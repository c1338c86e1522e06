"""Batched sampling: logits processors and draws vectorized over the batch.

The only per-request Python work is drawing a seeded request's uniform from its own generator, so
a seeded request samples the same tokens whatever else is in the batch.

Per-row work (logit bias, banned stop tokens, penalty counts, seeded draws, logprob entries)
runs under `_RowFailures`: an exception there fails only its own row, which the engine then
aborts, and every other row samples as if it were not in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.beam_search import num_candidates
from engine.grammar import apply_grammar_masks
from engine.outputs import PositionLogprobs
from engine.sequence import Sequence
from engine.step_inputs import SamplingBuffers, SamplingTensors
from kernels.reference import argmax_rows, sample_rows


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token under the model's distribution
    top_logprobs: list[PositionLogprobs | None]
    # Beam-search rows: the best candidate token ids and their logprobs (after the logits
    # processors, as transformers scores beams); None for other rows.
    beam_candidates: list[tuple[list[int], list[float]] | None] = field(default_factory=list)
    # Rows whose own processing raised: their token is meaningless and their request must fail.
    failed: dict[int, BaseException] = field(default_factory=dict)


class _RowFailures(dict):
    """Row -> the first exception its per-row work raised."""

    def run(self, row: int, work, *args) -> None:
        if row in self:
            return
        try:
            work(*args)
        except Exception as e:  # noqa: BLE001 - pinned to this row; the engine fails its request
            self[row] = e


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], max_rows: int = 256,
                 device: torch.device = torch.device("cpu"), argmax=argmax_rows, sample=sample_rows):
        """max_rows: the rows a step usually samples (the buffers grow past it); device: the logits';
        argmax and sample: the attention backend's argmax_rows and sample_rows (kernels/), the
        greedy pick and the temperature, top-k/p, min-p filters and draw."""
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.buffers = SamplingBuffers(max_rows, device)
        self.argmax = argmax
        self.sample = sample

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [len(seqs), vocab] in float32 or the model's dtype; row i belongs to seqs[i]."""
        if logits.shape[1] != self.vocab_size:  # (a slice is a torch op from Python even when it keeps all)
            logits = logits[:, : self.vocab_size]
        if all(_takes_raw_argmax(s) for s in seqs):
            # The logits as the LM head made them, read once: no float32 copy, no processors.
            n = len(seqs)
            return SampleResult(self.argmax(logits).tolist(), [0.0] * n, [None] * n, [None] * n)
        logits = logits.float()  # processors and probabilities in float32 whatever the model's dtype
        # Logprobs report the model's own distribution, before any processing (as vLLM does);
        # best_of ranks samples by their cumulative logprob, so it needs them too.
        want_logprobs = any(s.params.logprobs is not None or s.params.best_of > 1 for s in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        # In place: the runner hands over logits that nothing else reads, and raw_logprobs is
        # already its own tensor; a copy would be a full extra pass over [batch, vocab].
        failed = _RowFailures()
        tensors = self.buffers.fill([s.params for s in seqs], self.vocab_size)
        logits = self._apply_processors(logits, seqs, tensors, failed)
        token_ids = self._draw(logits, seqs, tensors, failed)
        beams = self._beam_candidates(logits, seqs)

        if raw_logprobs is None:
            return SampleResult(token_ids.tolist(), [0.0] * len(seqs), [None] * len(seqs), beams, dict(failed))
        chosen = raw_logprobs.gather(1, token_ids[:, None])[:, 0]
        max_k = max(s.params.logprobs or 0 for s in seqs)
        top_vals, top_ids = raw_logprobs.topk(max(max_k, 1), dim=-1)
        tops: list[PositionLogprobs | None] = [None] * len(seqs)

        def top_entry(i: int, k: int) -> None:
            entry = {int(token_ids[i]): float(chosen[i])}
            for tid, val in zip(top_ids[i, :k].tolist(), top_vals[i, :k].tolist()):
                entry.setdefault(tid, val)
            tops[i] = entry

        for i, seq in enumerate(seqs):
            if seq.params.logprobs is not None:
                failed.run(i, top_entry, i, seq.params.logprobs)
        return SampleResult(token_ids.tolist(), chosen.tolist(), tops, beams, dict(failed))

    @staticmethod
    def prompt_logprobs(logits: torch.Tensor, next_tokens: list[int], ks: list[int]) -> list[PositionLogprobs]:
        """Row i's logprob of next_tokens[i] and its ks[i] most likely tokens, under the model's
        raw distribution."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(next_tokens, device=logits.device)[:, None])[:, 0].tolist()
        top_vals, top_ids = logprobs.topk(max(max(ks), 1), dim=-1)
        entries = []
        for token, value, k, ids, vals in zip(next_tokens, chosen, ks, top_ids.tolist(), top_vals.tolist()):
            entry = {token: value}
            for tid, val in zip(ids[:k], vals[:k]):
                entry.setdefault(tid, val)
            entries.append(entry)
        return entries

    def _beam_candidates(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[list[int], list[float]] | None]:
        rows = [i for i, s in enumerate(seqs) if s.params.use_beam_search]
        result: list[tuple[list[int], list[float]] | None] = [None] * len(seqs)
        if not rows:
            return result
        ks = [min(num_candidates(seqs[i].params, self.eos_token_ids), self.vocab_size) for i in rows]
        values, ids = logits[rows].log_softmax(dim=-1).topk(max(ks), dim=-1)
        for row, k, vals, tids in zip(rows, ks, values.tolist(), ids.tolist()):
            result[row] = (tids[:k], vals[:k])
        return result

    def _apply_processors(self, logits: torch.Tensor, seqs: list[Sequence], tensors: SamplingTensors,
                          failed: _RowFailures | None = None) -> torch.Tensor:
        failed = _RowFailures() if failed is None else failed
        device = logits.device
        # Grammar masks first: whatever follows only lowers logits or rescales them, and a
        # forbidden token's -inf stays -inf through all of it.
        apply_grammar_masks(logits, [s.grammar for s in seqs], self.vocab_size, failed.run)

        def ban_and_bias(i: int, seq: Sequence) -> None:
            p = seq.params
            # min_tokens: EOS and stop tokens are impossible until enough tokens exist.
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=device)

        for i, seq in enumerate(seqs):
            failed.run(i, ban_and_bias, i, seq)

        if tensors.penalized:
            rows = tensors.penalized_rows
            logits[rows] = self._apply_penalties(logits[rows], seqs, tensors.penalized, tensors, failed)

        # Temperature, top-k/p and min-p belong to the draw (sample_rows), which skips greedy rows.
        return logits

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], rows_in_batch: list[int],
                         tensors: SamplingTensors, failed: _RowFailures) -> torch.Tensor:
        """vLLM's definitions: repetition divides positive / multiplies negative logits of
        tokens in prompt or output; presence and frequency subtract for output tokens.
        logits: the penalized rows only; rows_in_batch: their rows among seqs."""
        device = logits.device
        rows = len(rows_in_batch)
        output_counts = torch.zeros(rows, self.vocab_size, device=device)
        seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=device)

        def count(i: int, seq: Sequence) -> None:
            out_ids = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
            output_counts[i].index_add_(0, out_ids, torch.ones(len(out_ids), device=device))
            seen[i, torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=device)] = True

        for i, row in enumerate(rows_in_batch):
            failed.run(row, count, i, seqs[row])
        seen |= output_counts > 0
        rep, freq, pres = tensors.repetition, tensors.frequency, tensors.presence
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * output_counts - pres * (output_counts > 0).float()

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], tensors: SamplingTensors,
              failed: _RowFailures | None = None) -> torch.Tensor:
        failed = _RowFailures() if failed is None else failed
        if tensors.greedy is None:
            return self.argmax(logits)
        # One uniform per row (see kernels/reference.py's sample_rows). A seeded row draws its
        # uniform from its own generator: the same tokens whatever else is in the batch.
        uniform = torch.rand(len(seqs), device=logits.device)

        def seeded_uniform(i: int, generator: torch.Generator) -> None:
            uniform[i] = torch.rand(1, generator=generator).to(uniform.device)[0]

        for i, seq in enumerate(seqs):
            if seq.generator is not None and not seq.params.greedy:
                failed.run(i, seeded_uniform, i, seq.generator)
        return self.sample(logits, uniform, tensors.greedy, tensors.temperature, tensors.top_k, tensors.top_p,
                           tensors.min_p)


def _takes_raw_argmax(seq: Sequence) -> bool:
    """A greedy row whose logits no processor changes (no grammar, bias, penalty or pending
    min_tokens ban) and whose distribution nothing reads (no logprobs, beams or best_of): its
    token is the argmax of its raw logits."""
    p = seq.params
    return (p.greedy and not p.use_beam_search and p.logprobs is None and p.best_of == 1 and seq.grammar is None
            and not p.logit_bias and not p.has_penalties and seq.num_output_tokens >= p.min_tokens)

