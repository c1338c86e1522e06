"""The block manager under random sequences of allocate, append (one sequence or several at
once), fork, free and a swap round trip through a second pool."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
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


def sharing(seqs: list[FakeSeq]) -> list[tuple[int, ...]]:
    """The block tables with each block renamed by order of first appearance: equal when the
    same positions share blocks, whatever the physical ids."""
    names: dict[int, int] = {}
    return [tuple(names.setdefault(b, len(names)) for b in seq.block_table) for seq in seqs]


def fill_levels(bm: BlockManager, seqs: list[FakeSeq]) -> list[int]:
    """The filled slots of the sequences' distinct blocks, sorted."""
    return sorted(bm.filled[b] for b in {b for seq in seqs for b in seq.block_table})


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
    def append_one_decode_slot(self, data):
        """The scheduler's shortcut for one decode token: where it says yes, it did exactly what
        append_slots(seq, 1) does (no block taken, none copied, the same fill level); where it
        says no, it changed nothing."""
        seq = data.draw(st.sampled_from(self.seqs))
        general_bm, general_seq = copy.deepcopy((self.bm, seq))
        before = copy.deepcopy((self.bm.filled, self.bm.ref_counts, seq.block_table))
        if not self.bm.append_decode_slot(seq):
            assert (self.bm.filled, self.bm.ref_counts, seq.block_table) == before
            return
        assert general_bm.append_slots(general_seq, 1) == []
        assert (self.bm.filled, self.bm.ref_counts, seq.block_table, self.bm.num_free_blocks) == (
            general_bm.filled, general_bm.ref_counts, general_seq.block_table, general_bm.num_free_blocks)
        seq.num_computed_tokens += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def append_to_several(self, data):
        """One step's writes for several sequences: blocks_needed_for counts exactly the blocks
        append_slots then takes, shared last blocks included (the last writer writes in place)."""
        picked = data.draw(st.lists(st.sampled_from(self.seqs), min_size=1, max_size=4, unique_by=id))
        chunks = [(seq, data.draw(st.integers(1, BLOCK_SIZE + 1))) for seq in picked]
        needed = self.bm.blocks_needed_for(chunks)
        if needed > self.bm.num_free_blocks:
            return
        before = self.bm.num_free_blocks
        for seq, n in chunks:
            self.copies += self.bm.append_slots(seq, n)
            seq.num_computed_tokens += n
        assert self.bm.num_free_blocks == before - needed

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def swap_out_and_back(self, data):
        """A request (a sequence and every sequence sharing a block with it) moves to a second
        pool and back: the same sharing, the same fill levels, every block accounted for."""
        group = [data.draw(st.sampled_from(self.seqs))]
        while True:
            blocks = {b for seq in group for b in seq.block_table}
            more = [s for s in self.seqs if s not in group and blocks & set(s.block_table)]
            if not more:
                break
            group += more
        before = sharing(group), fill_levels(self.bm, group)
        cpu = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        copies_out = self.bm.move_to(group, cpu)
        assert sorted(src for src, _ in copies_out) == sorted(blocks)
        assert cpu.usage().num_used_blocks == len(blocks) and not any(self.bm.ref_counts[b] for b in blocks)
        assert (sharing(group), fill_levels(cpu, group)) == before
        copies_in = cpu.move_to(group, self.bm)
        assert len(copies_in) == len(blocks)
        assert cpu.num_free_blocks == NUM_BLOCKS and not any(cpu.ref_counts)
        assert (sharing(group), fill_levels(self.bm, group)) == before

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
        assert usage.num_blocks == NUM_BLOCKS
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
    assert bm.blocks_needed(child, 0) == bm.blocks_needed_for([(child, 0)]) == 0  # no write, no copy
    with pytest.raises(RuntimeError, match="sequence 1 already owns blocks"):
        bm.fork(parent, child)
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
