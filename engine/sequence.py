"""A sequence: one request's tokens, its place in the paged cache, and its sampling state."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from engine.grammar import GrammarState
from engine.outputs import PositionLogprobs, RequestMetrics
from engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    # Tokens whose K/V are in the cache. Generated tokens enter the cache one step after they
    # are sampled (as the next step's input), so this trails num_tokens by 1 while decoding.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    max_tokens: int = 0  # resolved against the context length
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] | None = None
    # One entry per prompt token (None for the first, which nothing predicts). Forks share the
    # list: it is complete before a request's first sample, so before any fork.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    index: int = 0  # which of the request's samples (0 .. best_of - 1)
    # Prefix-cache keys of the full blocks known so far (engine.block_manager), and how many of
    # this sequence's full blocks the cache has been offered.
    block_hashes: list[int] = field(default_factory=list)
    num_offered_blocks: int = 0
    # Incremental detokenization state (engine.detokenizer).
    output_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    # tokenizers' DecodeStream and how many tokens it has been fed; never shared by a fork.
    decode_stream: tuple[Any, int] | None = None
    # Constrained decoding: where the output is in the request's grammar (engine.grammar).
    # Kept through preemption (the tokens it has accepted stay the sequence's).
    grammar: GrammarState | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, top_logprobs: PositionLogprobs | None) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None and top_logprobs is not None:
            self.logprobs.append(top_logprobs)

    def fork(self, index: int) -> "Sequence":
        """A new sequence with this one's tokens and state but no blocks of its own
        (BlockManager.fork shares them)."""
        child = copy.copy(self)
        child.seq_id = next(_seq_ids)
        child.index = index
        child.token_ids = list(self.token_ids)
        child.block_table = []
        child.block_hashes = list(self.block_hashes)
        child.decode_stream = None  # the child's own is rebuilt from its offsets
        child.logprobs = list(self.logprobs) if self.logprobs is not None else None
        child.generator = None
        child.grammar = self.grammar.fork() if self.grammar is not None else None
        if self.params.seed is not None:
            # Each sample draws from its own stream, so it reproduces whatever the batch.
            child.generator = torch.Generator().manual_seed(hash((self.params.seed, index)) & (2**63 - 1))
        return child

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
