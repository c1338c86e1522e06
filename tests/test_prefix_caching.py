"""Automatic prefix caching: full blocks are found by content and reused, exactly."""

from __future__ import annotations


from engine import SamplingParams
from engine.block_manager import BlockManager
from engine.llm_engine import LLMEngine
from tests.conftest import assert_all_blocks_free

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SYSTEM = list(range(1000, 1100))  # a 100-token "system prompt": 6 full blocks of 16


def run(engine: LLMEngine, request_id: str, prompt, params=GREEDY):
    engine.add_request(request_id, prompt, params)
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done = out
    return done


def prefill_tokens(engine: LLMEngine, request_id: str, prompt) -> tuple[int, object]:
    """Run one request alone; return the prompt tokens it fed the model and its output."""
    fed = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        fed.extend(item.num_new_tokens for item in out.scheduled if item.seq.num_output_tokens == 0)
        return out

    engine.scheduler.schedule = recording
    try:
        out = run(engine, request_id, prompt)
    finally:
        engine.scheduler.schedule = schedule
    return sum(fed), out


def test_a_second_request_with_the_same_system_prompt_prefills_only_its_new_tokens(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64)
    first_fed, _ = prefill_tokens(engine, "a", SYSTEM + [5, 6, 7])
    assert first_fed == 103
    second_fed, out = prefill_tokens(engine, "b", SYSTEM + [8, 9, 10, 11])
    # 96 tokens (6 full blocks) come from the cache; the rest are computed.
    assert second_fed == 104 - 96
    assert out.num_cached_tokens == 96
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (103 + 104, 96)
    assert engine.block_manager.prefix_queries == 2 and engine.block_manager.prefix_hits == 1


def test_outputs_are_identical_with_caching_on_and_off(tiny_path):
    prompts = [SYSTEM + [i, i + 1, i + 2] for i in range(5)] + [SYSTEM[:48], SYSTEM[:48] + [3]]
    outputs = {}
    for caching in (False, True):
        engine = LLMEngine(model=tiny_path, num_kv_blocks=64, enable_prefix_caching=caching)
        outputs[caching] = [run(engine, f"r{i}", p).outputs[0].token_ids for i, p in enumerate(prompts)]
        assert (engine.stats().prefix_cache_hits > 0) == caching
        assert_all_blocks_free(engine)
    assert outputs[True] == outputs[False]


def test_a_whole_cached_prompt_still_computes_its_last_token(tiny_path):
    engine = LLMEngine(model=tiny_path, num_kv_blocks=64)
    prompt = SYSTEM[:64]  # exactly 4 blocks
    reference = run(engine, "a", prompt).outputs[0].token_ids
    fed, out = prefill_tokens(engine, "b", prompt)
    assert fed == 16  # three blocks reused; the fourth holds the token whose logits are needed
    assert out.outputs[0].token_ids == reference


def test_a_block_is_reused_only_after_the_same_prefix_not_for_the_same_tokens_elsewhere(tiny_path):
    """The key chains each block to its parent: a prompt whose first two blocks hold the tokens
    of another prompt's third and fourth blocks must not take their K/V (computed after other
    tokens, at other positions)."""
    head, tail = list(range(1000, 1032)), list(range(2000, 2032))
    prompts = [head + tail + [5], tail + [7, 8, 9], head + [7, 8, 9]]
    outputs = {}
    for caching in (False, True):
        engine = LLMEngine(model=tiny_path, num_kv_blocks=64, enable_prefix_caching=caching)
        outputs[caching] = [run(engine, f"r{i}", p) for i, p in enumerate(prompts)]
    assert [out.num_cached_tokens for out in outputs[True]] == [0, 0, 32]  # only the true prefix hits
    assert [o.outputs[0].token_ids for o in outputs[True]] == [o.outputs[0].token_ids for o in outputs[False]]


class Seq:
    """The block manager's view of a sequence with prefix caching."""

    def __init__(self, seq_id, tokens):
        self.seq_id, self.token_ids = seq_id, list(tokens)
        self.block_table, self.num_computed_tokens = [], 0
        self.block_hashes, self.num_offered_blocks = [], 0


def computed(bm: BlockManager, seq_id: int, tokens) -> Seq:
    """A sequence whose tokens are all computed and offered to the cache."""
    seq = Seq(seq_id, tokens)
    bm.append_slots(seq, len(seq.token_ids))
    seq.num_computed_tokens = len(seq.token_ids)
    bm.cache_full_blocks(seq)
    return seq


def test_freed_cached_blocks_stay_findable_until_reused():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = computed(bm, 0, range(9))
    cached_blocks = list(a.block_table[:2])
    bm.free(a)
    assert bm.num_free_blocks == 4  # free, yet still cached
    b = Seq(1, range(10))
    assert bm.reuse_cached_prefix(b) == 8
    assert b.block_table == cached_blocks
    bm.free(b)
    # Filling the pool with other content evicts them.
    c = Seq(2, range(100, 116))
    bm.append_slots(c, 16)
    d = Seq(3, range(10))
    assert bm.reuse_cached_prefix(d) == 0
    bm.free(c)
    assert bm.num_free_blocks == 4 and not any(bm.ref_counts)


def test_a_partly_refilled_pool_takes_unused_blocks_then_evicts_least_recently_freed_first():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a, b = computed(bm, 0, range(8)), computed(bm, 1, range(100, 108))
    bm.free(a)  # freed first, and within a request its tail block first
    bm.free(b)
    # Five blocks: the four never handed out, then one eviction: a's tail block.
    c = computed(bm, 2, range(200, 220))
    assert a.block_table == [] and c.block_table == [4, 5, 6, 7, 1]  # a held 0 and 1, b 2 and 3
    assert bm.reuse_cached_prefix(Seq(3, list(range(8)) + [9])) == 4  # a keeps its first block
    assert bm.reuse_cached_prefix(Seq(4, list(range(100, 108)) + [9])) == 8  # b is untouched
    # The evicted block forgot a's key and is cached again under c's.
    assert bm.reuse_cached_prefix(Seq(5, list(range(200, 220)) + [9])) == 20


def test_a_block_key_names_its_whole_prefix():
    """Keys chain to the parent block's key: a block's tokens after a different prefix, at
    another place, or after a prefix that differs only further back, are a miss."""
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    x, y, y2, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    held = [computed(bm, 0, x + y + z), computed(bm, 1, x + y2 + [0, 0, 0, 0])]
    assert bm.reuse_cached_prefix(Seq(2, y + z + [0])) == 0  # a's later blocks, at the start
    assert bm.reuse_cached_prefix(Seq(3, y2 + y + z + [0])) == 0  # a's later blocks, after another head
    # x + y2 is cached (by the second sequence); z after it is not, though z after x + y is.
    assert bm.reuse_cached_prefix(Seq(4, x + y2 + z + [0])) == 8
    assert bm.reuse_cached_prefix(Seq(5, x + y + z + [0])) == 12
    del held


def test_reusing_cached_blocks_shares_them_and_leaves_a_token_to_compute():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    owner = computed(bm, 0, range(12))
    reader = Seq(1, range(12))  # the whole prompt is cached: its last block is computed again
    assert bm.reuse_cached_prefix(reader) == 8
    assert reader.block_table == owner.block_table[:2] and reader.num_computed_tokens == 8
    assert [bm.ref_counts[b] for b in owner.block_table] == [2, 2, 1] and bm.num_free_blocks == 5
    assert bm.reuse_cached_prefix(reader) == 0 and len(reader.block_table) == 2  # it has blocks already
    # The reader computes on and offers its own new full blocks to the cache.
    reader.token_ids += list(range(100, 106))
    bm.append_slots(reader, 10)
    reader.num_computed_tokens = 18
    bm.cache_full_blocks(reader)
    bm.cache_full_blocks(reader)  # offering again changes nothing
    follower = Seq(2, reader.token_ids + [0])
    assert bm.reuse_cached_prefix(follower) == 16
    for seq in (owner, reader, follower):
        bm.free(seq)
    assert bm.num_free_blocks == 8 and not any(bm.ref_counts)
    assert BlockManager(8, 4).reuse_cached_prefix(Seq(3, range(12))) == 0  # caching off


def test_prefix_query_counters_add_up_from_zero():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    bm.record_prefix_query(10, 8)
    bm.record_prefix_query(6, 0)
    assert (bm.prefix_queries, bm.prefix_hits, bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (2, 1, 16, 8)
    off = BlockManager(8, 4)
    off.record_prefix_query(10, 8)
    assert (off.prefix_queries, off.prefix_hits, off.prefix_queried_tokens, off.prefix_hit_tokens) == (0, 0, 0, 0)
