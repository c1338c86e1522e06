"""CUDA graphs of the decode step (engine/cuda_graphs.py): every decode batch has a captured size;
the padded step (padding rows, static buffers, the LM head after the graph) gives the eager
step's logits and writes only its own KV slots, which runs on CPU with the Triton kernels under
the interpreter; on a CUDA machine the captured graphs replay the engine's decode steps and give
eager decoding's greedy tokens.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

pytest.importorskip("triton")

from engine import SamplingParams  # noqa: E402
from engine.cuda_graphs import DecodeGraphs, capture_sizes  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.settings import engine_config_from_env  # noqa: E402
from tests.conftest import assert_all_blocks_free  # noqa: E402
from tests.helpers import make_tiny_llama  # noqa: E402
from tests.test_correctness import run_staggered  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
# The padded step on CPU tensors: Triton runs them only under its interpreter.
on_the_interpreter = pytest.mark.skipif(not INTERPRETED, reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
PROMPTS = [
    "The first prompt, long enough to span more than one block of the cache",
    "Short",
    "A third prompt of middling length",
    "Four",
    "The fifth and last prompt arrives while the others decode",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("graphs"), num_hidden_layers=2, hidden_size=64,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                           max_position_embeddings=1024)


def engine_on(model: str, device: str, **kwargs) -> LLMEngine:
    # Block tables 64 blocks wide (1024 tokens): the graphs' attention splits the key range (split-K)
    # at small batches, as it does on the interpreter's 8-program target.
    settings = dict(attention_backend="triton", dtype="float32", num_kv_blocks=80, max_num_seqs=16, max_model_len=1024)
    return LLMEngine(model=model, device=device, **{**settings, **kwargs})


def test_every_decode_batch_has_a_captured_size():
    assert capture_sizes(128, 2048) == [1, 2, 4, *range(8, 129, 8)]
    assert capture_sizes(5, 2048) == [1, 2, 4, 5]
    assert capture_sizes(1, 2048) == [1]
    # A decode batch is at most max_num_seqs tokens and at most the token budget; 512 at most is captured.
    assert capture_sizes(256, 100)[-1] == 100 and capture_sizes(1024, 4096)[-1] == 512
    for max_seqs in (1, 3, 12, 128):
        sizes = capture_sizes(max_seqs, 2048)
        assert sizes[-1] == max_seqs
        # The smallest size holding n wastes at most 7 rows.
        assert all(min(s for s in sizes if s >= n) - n < 8 for n in range(1, max_seqs + 1))


def test_enforce_eager_is_a_setting_and_a_bad_value_names_it(monkeypatch):
    assert engine_config_from_env(model="m").enforce_eager is False
    monkeypatch.setenv("BENTO_LLM_ENFORCE_EAGER", "true")
    assert engine_config_from_env(model="m").enforce_eager is True
    monkeypatch.setenv("BENTO_LLM_ENFORCE_EAGER", "sometimes")
    with pytest.raises(ValueError, match="enforce_eager.*'sometimes'"):
        engine_config_from_env(model="m")


class DecodeSteps:
    """The real execute_model, recording each decode step's inputs and logits as it runs."""

    def __init__(self, runner):
        self.runner, self.execute = runner, runner.execute_model
        self.steps = []
        runner.execute_model = self

    def __call__(self, inputs):
        logits = self.execute(inputs)
        if inputs.all_decode:
            self.steps.append((inputs, logits.clone()))
        return logits


@pytest.mark.slow
@on_the_interpreter
def test_the_padded_step_gives_the_eager_logits_and_writes_only_its_slots(tiny):
    engine = engine_on(tiny, "cpu")
    runner = engine.runner.model_runner
    recorded = DecodeSteps(runner)
    run_staggered(engine, PROMPTS, every=2, params=GREEDY)
    assert_all_blocks_free(engine)
    graphs = DecodeGraphs.for_runner(runner)
    # The largest batch that runs padded: several real rows, and padding rows.
    inputs, eager_logits = max((step for step in recorded.steps if len(step[0].token_ids) not in graphs.sizes),
                               key=lambda step: len(step[0].token_ids))
    n, size = len(inputs.token_ids), graphs.padded_size(inputs)
    assert n >= 3 and size > n
    # Stale table entries (past a row's blocks, and the padding rows') point at other sequences'
    # blocks: read, they would change the logits.
    graphs.arrays["block_tables"][:] = runner.num_blocks - 1
    with torch.inference_mode():
        runner.execute_model.execute(inputs)  # eager: rewrites the step's slots with their values
        after_eager = [c.clone() for c in runner.k_caches + runner.v_caches]
        graphs.load(inputs, size)
        padded_logits = runner.model.compute_logits(graphs.forward(size)[:n])
    torch.testing.assert_close(padded_logits, eager_logits, rtol=1e-5, atol=1e-5)
    # The padding rows wrote nothing: the caches are the eager step's, byte for byte.
    assert all(torch.equal(a, b) for a, b in zip(runner.k_caches + runner.v_caches, after_eager))


@pytest.mark.slow
@on_the_interpreter
def test_the_engine_decodes_through_the_padded_step_as_it_does_eagerly(tiny):
    eager = engine_on(tiny, "cpu")
    expected = [o.outputs[0].token_ids for o in run_staggered(eager, PROMPTS, every=1, params=GREEDY)]
    padded = engine_on(tiny, "cpu")
    runner = padded.runner.model_runner
    runner.decode_graphs = DecodeGraphs.for_runner(runner)  # not captured on CPU: the padded forward, eagerly
    calls = []
    forward = runner.decode_graphs.forward
    runner.decode_graphs.forward = lambda size: calls.append(size) or forward(size)
    got = [o.outputs[0].token_ids for o in run_staggered(padded, PROMPTS, every=1, params=GREEDY)]
    assert got == expected
    assert {1, 2, 4, 8} <= set(calls)  # batches of up to 5 sequences, padded to 8
    assert_all_blocks_free(padded)


@pytest.mark.skipif(not ON_GPU, reason="captures CUDA graphs: needs a GPU (bench/gpu_check.sh runs it there)")
def test_captured_graphs_replay_the_decode_steps_with_eager_tokens(tiny):
    eager = engine_on(tiny, "cuda", enforce_eager=True)
    assert eager.runner.model_runner.decode_graphs is None
    expected = [o.outputs[0].token_ids for o in run_staggered(eager, PROMPTS, every=2, params=GREEDY)]
    del eager
    graphed = engine_on(tiny, "cuda")
    graphs = graphed.runner.model_runner.decode_graphs
    assert graphs is not None and sorted(graphs.graphs) == capture_sizes(16, 2048)
    got = [o.outputs[0].token_ids for o in run_staggered(graphed, PROMPTS, every=2, params=GREEDY)]
    assert got == expected
    assert graphs.replays > 10
    assert_all_blocks_free(graphed)


class GraphThenEager:
    """Each decode step a graph holds: replayed, then run again eagerly on the same inputs (which
    rewrites the step's KV slots); both logits kept, and both versions of the KV caches."""

    def __init__(self, runner):
        self.runner, self.execute = runner, runner.execute_model
        self.pairs, self.caches = [], []
        runner.execute_model = self

    def __call__(self, inputs):
        logits = self.execute(inputs)
        graphs, runner = self.runner.decode_graphs, self.runner
        if graphs.padded_size(inputs) is not None:
            replayed = torch.cat([c.float().flatten() for c in runner.k_caches + runner.v_caches])
            runner.decode_graphs = None
            try:
                self.pairs.append((logits.float(), self.execute(inputs).float()))
            finally:
                runner.decode_graphs = graphs
            self.caches.append((replayed, torch.cat([c.float().flatten() for c in runner.k_caches + runner.v_caches])))
        return logits


@pytest.mark.skipif(not ON_GPU, reason="captures CUDA graphs: needs a GPU (bench/gpu_check.sh runs it there)")
@pytest.mark.parametrize("quantization,dtype,rel_tol", [(None, "float32", 1e-5), (None, "bfloat16", 0.02),
                                                        ("int4", "bfloat16", 0.02), ("int8", "bfloat16", 0.02)])
def test_each_replayed_step_gives_the_eager_logits(tiny, quantization, dtype, rel_tol):
    """Accuracy rule: a replayed step's logits are within rel_tol of the eager step's largest logit,
    and so are the K/V it wrote (padding changes the matmuls' row counts, so half-precision results
    may differ in rounding)."""
    engine = engine_on(tiny, "cuda", dtype=dtype, quantization=quantization)
    recorder = GraphThenEager(engine.runner.model_runner)
    run_staggered(engine, PROMPTS, every=1, params=SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert len(recorder.pairs) >= 10
    assert_all_blocks_free(engine)
    for graphed, eager in recorder.pairs + recorder.caches:
        assert (graphed - eager).abs().max() <= rel_tol * eager.abs().max()


@pytest.mark.skipif(not ON_GPU, reason="captures CUDA graphs: needs a GPU (bench/gpu_check.sh runs it there)")
def test_a_profiled_engine_keeps_the_graphs_pool_within_its_memory_share(tiny):
    """Without num_kv_blocks the KV cache takes what gpu_memory_utilization leaves after the
    profiled peak and the graphs' pool (captured after the cache): the process stays within it."""
    gc.collect()
    torch.cuda.empty_cache()
    share = 0.2
    total = torch.cuda.mem_get_info()[1]
    engine = LLMEngine(model=tiny, device="cuda", attention_backend="triton", dtype="float32", max_num_seqs=16,
                       max_model_len=1024, gpu_memory_utilization=share)
    runner = engine.runner.model_runner
    assert runner.decode_graphs is not None
    run_staggered(engine, PROMPTS, every=1, params=GREEDY)
    assert_all_blocks_free(engine)
    # The allocator rounds each cache tensor up to its 2 MiB pages.
    slack = 2 * len(runner.k_caches + runner.v_caches) << 20
    assert torch.cuda.memory_reserved() <= share * total + slack
