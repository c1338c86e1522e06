"""Sliding-window models keep only the blocks inside their windows: when every layer slides
(Mistral), a sequence's blocks that fall out of the window go back to the pool as it grows, so
the blocks it holds stay bounded however long it runs, and greedy output still equals
transformers' past the window, with preemption (recompute and swap) and prefix-cache hits.
When some layer attends to everything (Qwen2 below max_window_layers, Gemma), no block is freed."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.block_manager import NO_BLOCK, BlockManager
from engine.llm_engine import LLMEngine
from tests.greedy_reference import Comparison, compare_greedy, hf_greedy
from tests.helpers import load_hf_reference, make_tiny_mistral, make_tiny_qwen2
from tests.test_block_manager import FakeSeq

WINDOW, BLOCK_SIZE, MAX_TOKENS = 10, 8, 24
PROMPTS = [
    "The history of the city goes back many centuries, to a small fishing village",
    "Hello, my name is",
    "The history of the city goes back many centuries, to a market town",
    "def add(a, b):\n    return",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# After a step a sequence needs positions c - WINDOW + 1 .. c - 1 (WINDOW - 1 of them) for its
# next query at c: they touch at most this many blocks.
MAX_HELD = (WINDOW - 1 + BLOCK_SIZE - 1) // BLOCK_SIZE + 1


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path = make_tiny_mistral(tmp_path_factory.mktemp("mistral-window"), sliding_window=WINDOW)
    return path, load_hf_reference(path), {}


def held_blocks(seq) -> int:
    return sum(block != NO_BLOCK for block in seq.block_table)


def run(engine: LLMEngine, prompts: list[str]) -> tuple[list, int]:
    """Add one prompt a step; (outputs in prompt order, the most blocks any sequence held after a step)."""
    pending, done, step, most = list(enumerate(prompts)), {}, 0, 0
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{step}-{i}", prompt, GREEDY)
        done.update((out.request_id, out) for out in engine.step() if out.finished)
        for group in engine.scheduler.running:
            most = max([most] + [held_blocks(seq) for seq in group.seqs])
        step += 1
    return sorted(done.values(), key=lambda out: int(out.request_id.split("-")[1])), most


def check(entry, outs) -> None:
    _, ref, greedy = entry
    result = Comparison()
    for out in outs:
        key = tuple(out.prompt_token_ids)
        assert len(key) + MAX_TOKENS > 2 * WINDOW  # the run goes well past the window
        if key not in greedy:
            greedy[key] = hf_greedy(ref, list(key), MAX_TOKENS)
        compare_greedy(out.outputs[0].token_ids, *greedy[key], result)
    assert result.near_ties <= 1, result


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_an_all_sliding_model_frees_blocks_out_of_the_window_and_equals_transformers(mistral, preemption_mode):
    engine = LLMEngine(model=mistral[0], block_size=BLOCK_SIZE, num_kv_blocks=8, max_num_batched_tokens=16,
                       preemption_mode=preemption_mode)
    assert engine.model_config.kv_window == WINDOW
    assert engine.max_model_len > WINDOW  # the window no longer caps the context
    outs, most = run(engine, PROMPTS)
    check(mistral, outs)
    # Four sequences of up to 15 + 24 tokens (5 blocks each if kept) share 8 blocks.
    assert most <= MAX_HELD
    assert engine.scheduler.num_preemptions > 0


def test_blocks_freed_out_of_the_window_stay_in_the_prefix_cache(mistral):
    engine = LLMEngine(model=mistral[0], block_size=BLOCK_SIZE, num_kv_blocks=32)
    first, most = run(engine, PROMPTS[:1])
    assert most <= MAX_HELD and engine.block_manager.prefix_hits == 0
    again, _ = run(engine, PROMPTS[:1])  # its prompt's blocks, freed long ago, are found and reused
    assert engine.block_manager.prefix_hits == 1 and again[0].num_cached_tokens >= BLOCK_SIZE
    check(mistral, first + again)


def test_a_model_with_a_global_layer_keeps_every_block_and_still_equals_transformers(tmp_path):
    """Qwen2 slides only from max_window_layers on: layer 0 reads the whole context."""
    path = make_tiny_qwen2(tmp_path, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    engine = LLMEngine(model=path, block_size=BLOCK_SIZE, num_kv_blocks=64, max_num_batched_tokens=16)
    assert engine.model_config.layer_windows == (None, WINDOW) and engine.model_config.kv_window is None
    outs, most = run(engine, PROMPTS[:2])
    check((path, load_hf_reference(path), {}), outs)
    longest = max(len(out.prompt_token_ids) for out in outs) + MAX_TOKENS
    assert most >= (longest - 1) // BLOCK_SIZE  # nothing was freed


def test_free_out_of_window_frees_exactly_the_blocks_no_future_query_reads():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    seq = FakeSeq(0)
    seq.token_ids, seq.block_hashes, seq.num_offered_blocks = list(range(30)), [], 0
    bm.append_slots(seq, 30)
    seq.num_computed_tokens = 30
    bm.cache_full_blocks(seq)
    # The next query is at 30 and sees 23..30: positions 0..19 (blocks 0-4) are out; block 5 holds 20..23.
    assert bm.free_out_of_window(seq, 8) == 5
    assert seq.block_table[:5] == [NO_BLOCK] * 5 and NO_BLOCK not in seq.block_table[5:]
    assert bm.num_free_blocks == 16 - 3
    assert bm.free_out_of_window(seq, 8) == 0  # nothing more until the sequence grows
    # Freed blocks stay cached: a new sequence with the same prefix finds all seven full blocks.
    other = FakeSeq(1)
    other.token_ids, other.block_hashes, other.num_offered_blocks = list(range(30)), [], 0
    assert bm.reuse_cached_prefix(other) == 28
    bm.free(other)

    # Forks share only live blocks; a swap round trip keeps the freed entries; free releases the rest.
    child = FakeSeq(2)
    bm.fork(seq, child)
    cpu = BlockManager(8, 4)
    assert BlockManager.num_distinct_blocks([seq, child]) == 3
    bm.move_to([seq, child], cpu)
    assert bm.num_free_blocks == 16 and cpu.num_free_blocks == 5
    cpu.move_to([seq, child], bm)
    assert seq.block_table[:5] == [NO_BLOCK] * 5 and child.block_table == seq.block_table
    seq.num_offered_blocks = 0
    bm.cache_full_blocks(seq)  # offering again after the move skips the freed entries
    bm.free(seq)
    bm.free(child)
    assert bm.num_free_blocks == 16 and cpu.num_free_blocks == 8
