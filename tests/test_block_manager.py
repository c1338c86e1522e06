"""The block manager under random sequences of allocate, append, fork and free."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_manager import BlockManager

NUM_BLOCKS = 12
BLOCK_SIZE = 4


@dataclass(eq=False)
class FakeSeq:
    """The block manager's view of a sequence: a table and how many slots hold K/V."""

    seq_id: int
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.seqs: list[FakeSeq] = []
        self.next_id = 0
        self.copies: list[tuple[int, int]] = []

    def _append(self, seq: FakeSeq, n: int) -> None:
        if self.bm.can_append(seq, n):
            before = self.bm.num_free_blocks
            needed = self.bm.blocks_needed(seq, n)
            self.copies += self.bm.append_slots(seq, n)
            seq.num_computed_tokens += n
            assert self.bm.num_free_blocks == before - needed
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens

    @rule(n=st.integers(1, 3 * BLOCK_SIZE))
    def allocate(self, n):
        seq = FakeSeq(self.next_id)
        self.next_id += 1
        self._append(seq, n)
        if seq.block_table:
            self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(1, BLOCK_SIZE + 1))
    def append(self, data, n):
        self._append(data.draw(st.sampled_from(self.seqs)), n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.seqs))
        child = FakeSeq(self.next_id)
        self.next_id += 1
        self.bm.fork(parent, child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.seqs))
        self.seqs.remove(seq)
        self.bm.free(seq)

    @invariant()
    def reference_counts_match_owners(self):
        owners = [0] * NUM_BLOCKS
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), "a table lists a block twice"
            for block in seq.block_table:
                owners[block] += 1
        assert owners == self.bm.ref_counts

    @invariant()
    def free_plus_used_is_total(self):
        usage = self.bm.usage()
        assert usage.num_free_blocks + usage.num_used_blocks == NUM_BLOCKS
        assert len(set(self.bm.free_blocks)) == self.bm.num_free_blocks
        assert all(self.bm.ref_counts[b] == 0 for b in self.bm.free_blocks)

    @invariant()
    def copy_on_write_only_from_shared_blocks(self):
        for src, dst in self.copies:
            assert src != dst
        self.copies.clear()

    def teardown(self):
        for seq in self.seqs:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert all(c == 0 for c in self.bm.ref_counts)


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase


def test_writing_into_a_shared_partial_block_copies_it_first():
    bm = BlockManager(8, BLOCK_SIZE)
    parent = FakeSeq(0)
    bm.append_slots(parent, 6)  # one full block, one half-filled
    parent.num_computed_tokens = 6
    child = FakeSeq(1)
    bm.fork(parent, child)
    assert bm.usage().num_shared_blocks == 2
    copies = bm.append_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    assert bm.usage().num_shared_blocks == 1
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_usage_reports_internal_waste():
    bm = BlockManager(8, BLOCK_SIZE)
    seq = FakeSeq(0)
    bm.append_slots(seq, 5)  # 2 blocks, 8 slots, 5 filled
    usage = bm.usage()
    assert (usage.num_used_blocks, usage.num_filled_slots, usage.num_allocated_slots) == (2, 5, 8)
    assert usage.internal_waste == 3 / 8
    bm.free(seq)
