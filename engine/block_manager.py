"""Physical KV blocks: a free list, reference counts, and each sequence's block table.

A sequence's block table maps its logical block i to a physical block id. Blocks are shared
by reference count (fork); a write into a shared block copies it first (copy-on-write).

Prefix caching: a full block is keyed by hash(parent block's key, its token ids), so a key
names the whole prefix up to and including the block. A new sequence takes the cached blocks
of its longest cached prefix instead of computing them. A freed block keeps its key and stays
findable in the free list, least recently freed first out, until it is handed out again.

Swapping moves a request's blocks to a second BlockManager (the CPU pool) and back; blocks
shared inside the request stay shared on the other side.

Sliding windows: when every layer of the model slides, a sequence's leading blocks that no
future query can see go back to the pool; their table entries become NO_BLOCK.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

# A block table entry whose block was freed: every layer's window has moved past it. The runner
# hands the kernels block 0 there, whose positions the window masks.
NO_BLOCK = -1


class HasBlocks(Protocol):
    seq_id: int
    block_table: list[int]
    num_computed_tokens: int
    token_ids: list[int]
    block_hashes: list[int]
    num_offered_blocks: int


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
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Slots filled per physical block, for the waste report.
        self.filled = [0] * num_blocks
        # Blocks never handed out are [_next_unused, num_blocks): a counter rather than a list,
        # so a large CPU pool costs nothing until used.
        self._next_unused = 0
        # Freed blocks, least recently freed first; cached ones keep their key until reused.
        self._freed: OrderedDict[int, None] = OrderedDict()
        self.block_key: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # prefix key -> physical block
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the cache
        self.prefix_hit_tokens = 0  # of those, tokens served from cached blocks
        self.prefix_queries = 0  # sequences looked up
        self.prefix_hits = 0  # sequences that reused at least one block

    @property
    def num_free_blocks(self) -> int:
        return len(self._freed) + self.num_blocks - self._next_unused

    @property
    def free_blocks(self) -> list[int]:
        return list(self._freed) + list(range(self._next_unused, self.num_blocks))

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def blocks_needed(self, seq: HasBlocks, num_new_tokens: int) -> int:
        """Blocks that writing num_new_tokens more K/V slots would take from the free list."""
        return self.blocks_needed_for([(seq, num_new_tokens)])

    def blocks_needed_for(self, chunks: list[tuple[HasBlocks, int]]) -> int:
        """blocks_needed over several sequences' writes in this order, counting a shared last
        block's copies as append_slots will make them: the last writer writes in place."""
        copying: dict[int, int] = {}
        needed = 0
        for seq, num_new_tokens in chunks:
            total = self._blocks_for(seq.num_computed_tokens + num_new_tokens)
            needed += max(0, total - len(seq.block_table))
            if num_new_tokens > 0 and self._writes_shared_block(seq, copying):
                last = seq.block_table[-1]
                copying[last] = copying.get(last, 0) + 1
                needed += 1
        return needed

    def can_append(self, seq: HasBlocks, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def _writes_shared_block(self, seq: HasBlocks, copying: dict[int, int] | None = None) -> bool:
        """Whether seq's next write lands in a partly filled last block others still share (less
        the `copying` references earlier writes of the same step have already moved off it)."""
        if seq.num_computed_tokens % self.block_size == 0 or not seq.block_table:
            return False
        last = seq.block_table[-1]
        return self.ref_counts[last] - (copying or {}).get(last, 0) > 1

    def _take(self) -> int:
        # Never-used blocks first: evicting a cached block is the last resort.
        if self._next_unused < self.num_blocks:
            block = self._next_unused
            self._next_unused += 1
        else:
            block, _ = self._freed.popitem(last=False)
            key = self.block_key[block]
            if key is not None:
                if self.cached.get(key) == block:
                    del self.cached[key]
                self.block_key[block] = None
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        self.filled[block] = 0
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed more often than referenced"
        if self.ref_counts[block] == 0:
            self._freed[block] = None

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

    def append_decode_slot(self, seq: HasBlocks) -> bool:
        """append_slots(seq, 1) where that takes no block and copies none: the token's slot is in
        seq's own partly filled last block. False (nothing changed) otherwise; the caller then
        takes the general path. Most of a step's sequences decode this way (15 of every 16
        tokens at block size 16), and the general path costs several us a sequence in Python."""
        pos = seq.num_computed_tokens
        table = seq.block_table
        if pos % self.block_size == 0 or len(table) != pos // self.block_size + 1:
            return False
        last = table[-1]
        if last == NO_BLOCK or self.ref_counts[last] != 1:
            return False
        self.filled[last] = max(self.filled[last], pos % self.block_size + 1)
        return True

    def fork(self, parent: HasBlocks, child: HasBlocks) -> None:
        """The child shares every block of the parent."""
        if child.block_table:
            raise RuntimeError(f"sequence {child.seq_id} already owns blocks")
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        for block in parent.block_table:
            if block != NO_BLOCK:
                self.ref_counts[block] += 1

    def free(self, seq: HasBlocks) -> None:
        # Tail blocks first, so they leave the cache before the prefix blocks others share.
        for block in reversed(seq.block_table):
            if block != NO_BLOCK:
                self._release(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        if hasattr(seq, "num_offered_blocks"):
            seq.num_offered_blocks = 0

    def free_out_of_window(self, seq: HasBlocks, window: int) -> int:
        """Free seq's leading blocks that no future query reads, when every layer attends only to
        the last `window` positions: a query at p >= seq.num_computed_tokens sees keys after
        p - window. Their entries become NO_BLOCK; they stay in the prefix cache like any freed
        block. Returns the number freed."""
        table = seq.block_table
        end = min(len(table), max(0, seq.num_computed_tokens - window + 1) // self.block_size)
        freed = 0
        # Freed entries are a prefix of the table: walk back from the last one out of the window.
        for logical in range(end - 1, -1, -1):
            if table[logical] == NO_BLOCK:
                break
            self._release(table[logical])
            table[logical] = NO_BLOCK
            freed += 1
        return freed

    # ---- prefix caching ----------------------------------------------------------------------
    def _key(self, seq: HasBlocks, logical: int) -> int:
        """The prefix key of seq's full logical block (extends seq.block_hashes as needed)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) <= logical:
            i = len(hashes)
            parent = hashes[i - 1] if i else None
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))
        return hashes[logical]

    def reuse_cached_prefix(self, seq: HasBlocks) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix; returns
        the tokens reused. At least one token stays to compute: the step needs its logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        blocks: list[int] = []
        for logical in range((len(seq.token_ids) - 1) // self.block_size):
            block = self.cached.get(self._key(seq, logical))
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._freed[block]
            self.ref_counts[block] += 1
        seq.block_table = blocks
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_offered_blocks = len(blocks)
        return seq.num_computed_tokens

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        self.prefix_queries += 1
        self.prefix_hits += num_hit_tokens > 0
        self.prefix_queried_tokens += num_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, seq: HasBlocks) -> None:
        """Offer seq's newly computed full blocks to the cache (call once their K/V are written)."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for logical in range(seq.num_offered_blocks, num_full):
            key, block = self._key(seq, logical), seq.block_table[logical]
            # A block already cached under its key, or a second copy of a cached prefix, stays as
            # is; a freed entry has nothing to offer.
            if block != NO_BLOCK and self.block_key[block] is None and key not in self.cached:
                self.block_key[block] = key
                self.cached[key] = block
        seq.num_offered_blocks = max(seq.num_offered_blocks, num_full)

    # ---- swapping ----------------------------------------------------------------------------
    @staticmethod
    def num_distinct_blocks(seqs: list[HasBlocks]) -> int:
        return len({block for seq in seqs for block in seq.block_table if block != NO_BLOCK})

    def move_to(self, seqs: list[HasBlocks], dst: "BlockManager") -> list[tuple[int, int]]:
        """Move the sequences' blocks from this pool to dst, keeping blocks shared between them
        shared. Returns the (src, dst) block copies to perform."""
        if self.num_distinct_blocks(seqs) > dst.num_free_blocks:
            raise RuntimeError("destination pool is out of blocks (caller must check)")
        mapping: dict[int, int] = {}
        for seq in seqs:
            table = []
            for block in seq.block_table:
                if block == NO_BLOCK:
                    table.append(block)
                    continue
                if block in mapping:
                    dst.ref_counts[mapping[block]] += 1
                else:
                    mapping[block] = dst._take()
                    dst.filled[mapping[block]] = self.filled[block]
                table.append(mapping[block])
                self._release(block)
            seq.block_table = table
            # The moved copies are new physical blocks: offer them to dst's cache afresh.
            seq.num_offered_blocks = 0
        return list(mapping.items())

    def usage(self) -> KVCacheUsage:
        used = [b for b, refs in enumerate(self.ref_counts) if refs > 0]
        return KVCacheUsage(
            num_blocks=self.num_blocks,
            num_used_blocks=len(used),
            num_free_blocks=self.num_free_blocks,
            num_shared_blocks=sum(1 for b in used if self.ref_counts[b] > 1),
            num_filled_slots=sum(self.filled[b] for b in used),
            num_allocated_slots=len(used) * self.block_size,
        )

    def block_states(self) -> str:
        """One character per block, for the dashboard: 'f' free, 'c' free but still holding a
        cached prefix, 'u' in use by one sequence, 's' shared. O(blocks); read it on the thread
        that steps (engine/kv_snapshot.py)."""
        states = bytearray(b"f" * self.num_blocks)
        for block in self._freed:
            if self.block_key[block] is not None:
                states[block] = ord("c")
        for block, refs in enumerate(self.ref_counts):
            if refs:
                states[block] = ord("u") if refs == 1 else ord("s")
        return states.decode()
