"""A step's inputs in the runner's buffers: a decode step whose every token samples hands the
model no logits indices (its final hidden states are used as they are, no gather), and the
model's logits are the same either way."""

from __future__ import annotations

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
