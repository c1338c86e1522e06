"""Continuous batching: every step re-forms the batch under a token budget and a sequence cap.

Order of a step: running decodes first (one token each, so a long prompt never stalls them),
then running prefills that are still chunked, then waiting requests first-come-first-served.
When blocks run out, the most recently admitted running sequence is preempted by recompute:
its blocks are freed and it goes back to the front of the queue to prefill prompt plus
generated tokens again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # query tokens fed this step

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the last known token, so the step samples a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        def schedule_running(seq: Sequence) -> bool:
            """Schedule seq's next tokens, preempting newer unscheduled sequences for blocks.
            False when seq itself had to be preempted."""
            nonlocal budget
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_append(seq, num_new):
                victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled and s is not seq), seq)
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    return False
            out.block_copies += self.block_manager.append_slots(seq, num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            scheduled.add(seq.seq_id)
            budget -= num_new
            return True

        for decoding in (True, False):
            for seq in list(self.running):
                if budget == 0:
                    break
                if seq.status is not SequenceStatus.RUNNING or seq.seq_id in scheduled:
                    continue  # preempted earlier in this loop, or already in the batch
                if (seq.num_uncomputed_tokens == 1) == decoding:
                    schedule_running(seq)

        # Admitting new work right after preempting would only thrash the cache.
        while self.waiting and budget > 0 and not out.num_preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_append(seq, num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            out.block_copies += self.block_manager.append_slots(seq, num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            scheduled.add(seq.seq_id)
            budget -= num_new
            logger.debug(
                "admitted seq %d (%s): %d tokens this step, %d blocks, %d free",
                seq.seq_id, seq.request_id, num_new, len(seq.block_table), self.block_manager.num_free_blocks,
            )
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug(
            "preempted seq %d (%s) by recompute: %d tokens to prefill again, %d blocks free",
            seq.seq_id, seq.request_id, seq.num_tokens, self.block_manager.num_free_blocks,
        )

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the batch and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
