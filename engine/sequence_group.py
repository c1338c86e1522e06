"""A request: its sequences (one, n parallel samples, or beams), scheduled and preempted together."""

from __future__ import annotations

import concurrent.futures
import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

_admission_order = itertools.count()


class GroupStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    SWAPPED = auto()
    FINISHED = auto()


@dataclass(eq=False)
class SequenceGroup:
    request_id: str
    seqs: list[Sequence]  # live (running or waiting) sequences; finished ones move to `finished`
    status: GroupStatus = GroupStatus.WAITING
    # Finished samples, or for beam search the best finished hypotheses (at most the beam width).
    finished: list[Sequence] = field(default_factory=list)
    # Set on first admission; swapped requests come back in this order.
    order: int | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    # Beam search: the step had no way to improve on its finished hypotheses.
    beam_search_done: bool = False
    # Structured outputs: the request's grammar, compiling; it is scheduled once compiled.
    grammar_future: concurrent.futures.Future | None = None

    @classmethod
    def single(cls, seq: Sequence) -> "SequenceGroup":
        return cls(request_id=seq.request_id, seqs=[seq])

    @property
    def first(self) -> Sequence:
        return (self.seqs or self.finished)[0]

    @property
    def params(self) -> SamplingParams:
        return self.first.params

    @property
    def metrics(self) -> RequestMetrics:
        return self.first.metrics

    @property
    def prompt(self) -> str | None:
        return self.first.prompt

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.first.prompt_token_ids

    @property
    def max_num_seqs(self) -> int:
        """Sequences this request may run at once: what admission must leave room for."""
        return self.params.best_of

    @property
    def needs_fork(self) -> bool:
        """Whether the next sample is the request's first and must fan out into best_of
        sequences sharing the prompt's blocks."""
        p = self.params
        return (
            p.best_of > 1 and not p.use_beam_search
            and len(self.seqs) == 1 and not self.finished and self.seqs[0].num_output_tokens == 0
        )

    @property
    def is_finished(self) -> bool:
        return self.status is GroupStatus.FINISHED

    def mark_admitted(self) -> None:
        if self.order is None:
            self.order = next(_admission_order)

    def retire(self, seq: Sequence) -> None:
        """A sequence finished: it leaves the live set."""
        self.seqs.remove(seq)
        self.finished.append(seq)
