"""Continuous batching: every step re-forms the batch under a token budget and a sequence cap.

The unit is a request (a SequenceGroup): its sequences are admitted, preempted and swapped
together. Order of a step: running decodes first (one token per sequence, so a long prompt
never stalls them), then running prefills that are still chunked, then swapped requests back
in, oldest first, then waiting requests first-come-first-served (only once nothing is swapped
out: swapped requests keep their place).

When blocks run out, the most recently admitted running request is preempted: swapped to the
CPU pool if it has several sequences (their shared blocks would be lost to a recompute), else
recomputed (its blocks are freed and it goes back to the front of the queue to prefill prompt
plus generated tokens again, reusing whatever the prefix cache still holds).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Sequence, SequenceStatus
from engine.sequence_group import GroupStatus, SequenceGroup

logger = logging.getLogger(__name__)

Chunk = tuple[Sequence, int]


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # query tokens fed this step
    # The sequences that draw a token from this chunk's logits: the sequence itself, and at a
    # request's first sample also the best_of - 1 sequences forked from it.
    sample_seqs: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sample_seqs:
            self.sample_seqs = [self.seq]

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the last known token, so the step samples a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, CPU)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (CPU, device)
    num_preempted: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, cpu_block_manager: BlockManager):
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.preemption_mode = config.preemption_mode
        self.block_manager = block_manager
        self.cpu_block_manager = cpu_block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # admission order, oldest first
        self.swapped: list[SequenceGroup] = []  # admission order, oldest first
        self.num_preemptions = 0
        self.num_swap_outs = 0

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _num_running_seqs(self) -> int:
        return sum(g.max_num_seqs for g in self.running)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._budget = self.max_num_batched_tokens
        self._scheduled: set[int] = set()  # id() of groups in this step's batch

        for decoding in (True, False):
            for group in list(self.running):
                if self._budget == 0:
                    break
                if group.status is not GroupStatus.RUNNING or id(group) in self._scheduled:
                    continue  # preempted earlier in this loop, or already in the batch
                if decoding and self._schedule_lone_decode(group, out):
                    continue
                if all(s.num_uncomputed_tokens == 1 for s in group.seqs) == decoding:
                    self._schedule_running(group, out, may_preempt=True)

        # Bringing work back or admitting new work right after preempting would only thrash.
        if not out.num_preempted:
            self._swap_in(out)
        if not out.num_preempted and not self.swapped:
            self._admit(out)
        return out

    def _schedule_lone_decode(self, group: SequenceGroup, out: SchedulerOutput) -> bool:
        """A one-sequence request's next decode token whose slot is in its own last block: no
        block to find, so nothing to preempt; _schedule_running's result, at a fraction of its
        Python (a step's host work is most of a GPU step). False: nothing done, take that path."""
        if len(group.seqs) != 1:
            return False
        seq = group.seqs[0]
        # best_of > 1: the first sample forks (needs_fork); beams: chosen together.
        if seq.params.best_of > 1 or seq.params.use_beam_search or seq.num_uncomputed_tokens != 1:
            return False
        if not self.block_manager.append_decode_slot(seq):
            return False
        out.scheduled.append(ScheduledSequence(seq, 1, [seq]))
        self._budget -= 1
        self._scheduled.add(id(group))
        return True

    def _chunks(self, group: SequenceGroup, budget: int) -> list[Chunk]:
        """Each live sequence's tokens to feed this step, within the budget."""
        seqs = [s for s in group.seqs if s.num_uncomputed_tokens > 0]
        wanted = [s.num_uncomputed_tokens for s in seqs]
        if sum(wanted) <= budget:
            return list(zip(seqs, wanted))
        # Beams are chosen together from every beam's next-token logits: hold each beam's last
        # token back until all of them fit in one step.
        hold_back = 1 if group.params.use_beam_search else 0
        chunks = []
        for seq, want in zip(seqs, wanted):
            n = min(want - hold_back, budget)
            if n > 0:
                chunks.append((seq, n))
                budget -= n
        return chunks

    def _schedule_running(self, group: SequenceGroup, out: SchedulerOutput, may_preempt: bool) -> None:
        """Schedule the group's next tokens, preempting newer unscheduled requests for blocks."""
        while True:
            chunks = self._chunks(group, self._budget)
            if not chunks:
                return
            if self.block_manager.blocks_needed_for(chunks) <= self.block_manager.num_free_blocks:
                break
            if not may_preempt:
                return
            victim = next(
                (g for g in reversed(self.running) if id(g) not in self._scheduled and g is not group), group
            )
            self._preempt(victim, out)
            if victim is group:
                return
        self._commit(group, chunks, out)

    def _commit(self, group: SequenceGroup, chunks: list[Chunk], out: SchedulerOutput) -> None:
        for seq, n in chunks:
            out.block_copies += self.block_manager.append_slots(seq, n)
            item = ScheduledSequence(seq, n)
            if item.samples and group.needs_fork:
                item.sample_seqs = [seq, *self._fork_samples(group, seq, n)]
            out.scheduled.append(item)
            self._budget -= n
        self._scheduled.add(id(group))

    def _fork_samples(self, group: SequenceGroup, seq: Sequence, num_new_tokens: int) -> list[Sequence]:
        """The request's first sample: best_of - 1 more sequences share every prompt block
        (the partly filled last one is copied on its first write)."""
        children = []
        for index in range(1, group.params.best_of):
            child = seq.fork(index)
            self.block_manager.fork(seq, child)
            child.num_computed_tokens = seq.num_computed_tokens + num_new_tokens  # after this step
            children.append(child)
        group.seqs.extend(children)
        return children

    def _swap_in(self, out: SchedulerOutput) -> None:
        while self.swapped and self._budget > 0:
            group = self.swapped[0]
            # Room for the blocks, plus a new (or copied) block per sequence to write into.
            needed = BlockManager.num_distinct_blocks(group.seqs) + len(group.seqs)
            if needed > self.block_manager.num_free_blocks:
                return
            if self._num_running_seqs() + group.max_num_seqs > self.max_num_seqs:
                return
            self.swapped.pop(0)
            out.blocks_to_swap_in += self.cpu_block_manager.move_to(group.seqs, self.block_manager)
            group.status = GroupStatus.RUNNING
            self._insert_running(group)
            logger.debug("swapped in %s: %d blocks free", group.request_id, self.block_manager.num_free_blocks)
            self._schedule_running(group, out, may_preempt=False)

    def _admit(self, out: SchedulerOutput) -> None:
        bm = self.block_manager
        while self.waiting and self._budget > 0:
            group = self.waiting[0]
            if self.running and self._num_running_seqs() + group.max_num_seqs > self.max_num_seqs:
                return
            # Cached positions compute no logits, so a request asking for prompt logprobs
            # prefills its whole prompt.
            hits = {
                s.seq_id: bm.reuse_cached_prefix(s)
                for s in group.seqs
                if not s.block_table and s.params.prompt_logprobs is None
            }
            chunks = self._chunks(group, self._budget)
            if not chunks or bm.blocks_needed_for(chunks) > bm.num_free_blocks:
                for seq in group.seqs:  # give the cache hits back
                    bm.free(seq)
                return
            for seq in group.seqs:
                if seq.seq_id in hits:
                    bm.record_prefix_query(seq.num_tokens, hits[seq.seq_id])
            self.waiting.popleft()
            if group.order is None:
                group.num_cached_tokens = hits.get(group.seqs[0].seq_id, 0)
                group.metrics.first_scheduled_time = time.time()
            group.mark_admitted()
            group.status = GroupStatus.RUNNING
            for seq in group.seqs:
                seq.status = SequenceStatus.RUNNING
            self._insert_running(group)
            self._commit(group, chunks, out)
            logger.debug(
                "admitted %s: %d tokens this step (%d from the prefix cache), %d blocks free",
                group.request_id, sum(n for _, n in chunks), sum(hits.values()), bm.num_free_blocks,
            )

    def _insert_running(self, group: SequenceGroup) -> None:
        bisect.insort(self.running, group, key=lambda g: g.order)

    # ---- preemption --------------------------------------------------------------------------
    def _wants_swap(self, group: SequenceGroup) -> bool:
        if self.preemption_mode == "recompute":
            return False
        if self.preemption_mode == "auto" and group.max_num_seqs == 1:
            return False
        return BlockManager.num_distinct_blocks(group.seqs) <= self.cpu_block_manager.num_free_blocks

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        self.running.remove(group)
        self.num_preemptions += 1
        out.num_preempted += 1
        for seq in group.seqs:
            seq.num_preemptions += 1
        if self._wants_swap(group):
            out.blocks_to_swap_out += self.block_manager.move_to(group.seqs, self.cpu_block_manager)
            group.status = GroupStatus.SWAPPED
            bisect.insort(self.swapped, group, key=lambda g: g.order)
            self.num_swap_outs += 1
            how = "swap"
        else:
            for seq in group.seqs:
                self.block_manager.free(seq)
                seq.status = SequenceStatus.WAITING
            group.status = GroupStatus.WAITING
            self.waiting.appendleft(group)
            how = "recompute"
        logger.debug(
            "preempted %s by %s: %d blocks free", group.request_id, how, self.block_manager.num_free_blocks
        )

    # ---- leaving -----------------------------------------------------------------------------
    def free_seq(self, seq: Sequence) -> None:
        """A sequence of a running request finished: its blocks go back at once."""
        self.block_manager.free(seq)

    def finish(self, group: SequenceGroup) -> None:
        """Take a finished or aborted request out of the batch and free its blocks at once."""
        if group in self.running:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)
        elif group in self.swapped:
            self.swapped.remove(group)
        pool = self.cpu_block_manager if group.status is GroupStatus.SWAPPED else self.block_manager
        for seq in group.seqs:
            pool.free(seq)
        group.status = GroupStatus.FINISHED
