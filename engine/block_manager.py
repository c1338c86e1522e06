"""Physical KV blocks: a free list, reference counts, and each sequence's block table.

A sequence's block table maps its logical block i to a physical block id. Blocks are shared
by reference count (fork); a write into a shared block copies it first (copy-on-write).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


class HasBlocks(Protocol):
    seq_id: int
    block_table: list[int]
    num_computed_tokens: int


@dataclass
class KVCacheUsage:
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_shared_blocks: int  # blocks referenced by more than one sequence
    num_filled_slots: int  # token slots holding K/V (counted once per physical block)
    num_allocated_slots: int

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def internal_waste(self) -> float:
        """Allocated but unfilled slots over allocated slots."""
        if not self.num_allocated_slots:
            return 0.0
        return 1.0 - self.num_filled_slots / self.num_allocated_slots


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        # Slots filled per physical block, for the waste report.
        self.filled = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def blocks_needed(self, seq: HasBlocks, num_new_tokens: int) -> int:
        """Blocks that writing num_new_tokens more K/V slots would take from the free list."""
        total = self._blocks_for(seq.num_computed_tokens + num_new_tokens)
        new = max(0, total - len(seq.block_table))
        if num_new_tokens > 0 and self._writes_shared_block(seq):
            new += 1
        return new

    def can_append(self, seq: HasBlocks, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def _writes_shared_block(self, seq: HasBlocks) -> bool:
        offset = seq.num_computed_tokens % self.block_size
        if offset == 0 or not seq.block_table:
            return False
        return self.ref_counts[seq.block_table[-1]] > 1

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        self.filled[block] = 0
        return block

    def append_slots(self, seq: HasBlocks, num_new_tokens: int) -> list[tuple[int, int]]:
        """Reserve slots for num_new_tokens K/V writes after seq.num_computed_tokens.
        Returns (src, dst) block copies the caller must perform before writing."""
        if not self.can_append(seq, num_new_tokens):
            raise RuntimeError(f"sequence {seq.seq_id}: out of KV blocks (caller must check can_append)")
        copies: list[tuple[int, int]] = []
        if num_new_tokens > 0 and self._writes_shared_block(seq):
            src = seq.block_table[-1]
            dst = self._take()
            self.filled[dst] = self.filled[src]
            self.ref_counts[src] -= 1
            seq.block_table[-1] = dst
            copies.append((src, dst))
            logger.debug("seq %d: copy-on-write block %d -> %d", seq.seq_id, src, dst)
        total = self._blocks_for(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take())
        # Record fill levels now: the slots are written by this step's forward pass.
        end = seq.num_computed_tokens + num_new_tokens
        for logical in range(seq.num_computed_tokens // self.block_size, self._blocks_for(end)):
            block = seq.block_table[logical]
            self.filled[block] = max(self.filled[block], min(self.block_size, end - logical * self.block_size))
        return copies

    def fork(self, parent: HasBlocks, child: HasBlocks) -> None:
        """The child shares every block of the parent."""
        if child.block_table:
            raise RuntimeError(f"sequence {child.seq_id} already owns blocks")
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        for block in parent.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: HasBlocks) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed more often than referenced"
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def usage(self) -> KVCacheUsage:
        used = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        return KVCacheUsage(
            num_blocks=self.num_blocks,
            num_used_blocks=len(used),
            num_free_blocks=self.num_free_blocks,
            num_shared_blocks=sum(1 for b in used if self.ref_counts[b] > 1),
            num_filled_slots=sum(self.filled[b] for b in used),
            num_allocated_slots=len(used) * self.block_size,
        )
