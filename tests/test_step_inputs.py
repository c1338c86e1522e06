"""A step's inputs in the runner's buffers: a decode step whose every token samples hands the
model no logits indices (its final hidden states are used as they are, no gather), and the
model's logits are the same either way."""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.forward_context import forward_context
from engine.step_inputs import StepBuffers, StepInputs
from tests.helpers import make_tiny_llama


def step(token_ids: list[int], logits_indices: list[int], all_decode: bool) -> StepInputs:
    n = len(token_ids)
    return StepInputs(
        token_ids=token_ids, positions=list(range(5, 5 + n)), slot_mapping=list(range(5, 5 + n)),
        block_tables=[0] * n, max_blocks=1, context_lens=[6] * n, cu_query_lens=list(range(n + 1)),
        logits_indices=logits_indices, max_query_len=1, all_decode=all_decode,
    )


def test_logits_indices_are_none_only_where_every_token_samples_in_order():
    buffers = StepBuffers(16, 4, 2, torch.device("cpu"))
    assert buffers.fill(step([7, 8, 9], [0, 1, 2], True))[2] is None
    for indices in ([0, 2], [1, 0, 2], [0, 1, 2, 1]):  # some rows, out of order, prompt logprob rows after
        got = buffers.fill(step([7, 8, 9], indices, True))[2]
        assert got.tolist() == indices


def test_the_model_gives_the_same_logits_without_indices_as_with_every_row(tmp_path):
    llm = LLM(make_tiny_llama(tmp_path), dtype="float32", num_kv_blocks=8, max_num_seqs=4)
    runner = llm.engine.runner.model_runner
    inputs = step([3, 11, 5], [0, 1, 2], True)
    ids, positions, _, meta = runner.buffers.fill(inputs)
    logits = []
    for indices in (None, torch.arange(3)):
        with torch.inference_mode(), forward_context(meta, runner.backend, positions):
            logits.append(runner.model(ids, positions, indices).clone())
    assert logits[0].shape[0] == 3 and torch.equal(logits[0], logits[1])


def test_a_buffer_hands_out_one_view_per_length_holding_each_fill():
    """_Buffer keeps its slice of each length: the same tensor comes back for a length filled
    again, with the new values; other lengths and a grown buffer give their own."""
    buffers = StepBuffers(4, 2, 2, torch.device("cpu"))
    first = buffers.token_ids.fill([1, 2])
    again = buffers.token_ids.fill([3, 4])
    assert again is first and first.tolist() == [3, 4]
    assert buffers.token_ids.fill([5, 6, 7]).tolist() == [5, 6, 7] and first.tolist() == [5, 6]
    grown = buffers.token_ids.fill(list(range(9)))  # past the 4 it held: a new buffer
    assert grown.tolist() == list(range(9))
    assert buffers.token_ids.fill([8, 9]) is not first and buffers.token_ids.fill([8, 9]).tolist() == [8, 9]
    for n in range(1, 70):  # more lengths than it keeps views of: still each fill's values
        assert buffers.slot_mapping.fill(list(range(n))).tolist() == list(range(n))
    assert len(buffers.slot_mapping.views) <= 64


def test_rotary_tables_are_the_float32_tables_rows_rounded_once():
    """RotaryEmbedding.table: each position's float32 row rounded to the model's dtype, shaped
    [tokens, 1, rotary_dim], the same bits as gathering first and rounding after, whichever dtype
    asks (the kept tables are rounded again for another)."""
    from engine.layers.rotary import RopeSpec, RotaryEmbedding

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    rotary = RotaryEmbedding(RopeSpec(inv_freq, 0.9), 256)
    positions = torch.tensor([0, 7, 255, 7, 100])
    for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16):
        table = rotary.table(positions, dtype)
        for got, full in ((table.cos, rotary.cos), (table.sin, rotary.sin)):
            want = full[positions][:, None, :].to(dtype)
            assert got.dtype == dtype and got.shape == (5, 1, 64) and got.is_contiguous()
            assert torch.equal(got, want)
    rotary.cos = rotary.cos * 2  # a new buffer (as .to() makes): rounded again from it
    assert torch.equal(rotary.table(positions, torch.bfloat16).cos, rotary.cos[positions][:, None, :].bfloat16())
    rotary.sin = rotary.sin * 2  # either buffer alone
    assert torch.equal(rotary.table(positions, torch.bfloat16).sin, rotary.sin[positions][:, None, :].bfloat16())


def test_inference_mode_runs_its_function_in_inference_mode_from_outside_and_inside_it():
    """engine.forward_context.inference_mode: the function runs in inference mode (its tensors are
    inference tensors) whether called outside it or within it, and the mode is off again after."""
    from engine.forward_context import inference_mode

    entered = []

    @inference_mode
    def make():
        entered.append(torch.is_inference_mode_enabled())
        return torch.ones(2)

    assert make().is_inference() and not torch.is_inference_mode_enabled()
    with torch.inference_mode():
        assert make().is_inference()
    assert entered == [True, True] and make.__name__ == "make"


def test_forward_contexts_nest_and_each_restores_the_one_before_even_on_an_error():
    from engine.forward_context import forward_context, get_forward_context

    with forward_context("outer", "backend", None) as outer:
        assert get_forward_context() is outer and outer.meta == "outer"
        with pytest.raises(KeyError), forward_context("inner", "backend", None):
            assert get_forward_context().meta == "inner"
            raise KeyError("a layer failed")
        assert get_forward_context() is outer
    with pytest.raises(RuntimeError, match="outside a forward pass"):
        get_forward_context()
