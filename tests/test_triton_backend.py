"""The engine on the Triton attention backend gives the torch backend's greedy tokens.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 from the root conftest),
so the model is tiny; on a CUDA machine the same test runs the compiled kernels.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from engine import SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from tests.helpers import make_tiny_llama  # noqa: E402
from tests.test_correctness import run_staggered  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [
    "A shared system prompt that is long enough to fill more than one block. Question one?",
    "A shared system prompt that is long enough to fill more than one block. Question two, longer?",
    "Short",
    "Another prompt of middling length here",
]


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    # 9 query heads over 3 KV heads, as in SmolLM2: a GQA ratio that is no power of two.
    return make_tiny_llama(
        tmp_path_factory.mktemp("triton"), num_hidden_layers=1, hidden_size=72, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, intermediate_size=64,
    )


def test_triton_backend_matches_torch_on_a_mixed_batch_with_prefix_cache_hits(tiny_gqa):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results, hits = {}, {}
    for backend in ("torch", "triton"):
        # A 16-token budget chunks the long prompts, so steps mix decodes with prefill chunks
        # that attend to context already in the cache; the second shared-prefix prompt arrives
        # after the first finished its prefill, so its first blocks are prefix-cache hits.
        engine = LLMEngine(model=tiny_gqa, attention_backend=backend, num_kv_blocks=32, max_num_batched_tokens=16)
        assert engine.runner.backend.name == backend
        outs = run_staggered(engine, PROMPTS, every=6, params=params)
        results[backend] = [o.outputs[0].token_ids for o in outs]
        hits[backend] = engine.stats().prefix_cache_hits
    assert hits["triton"] == hits["torch"] >= 16
    assert results["triton"] == results["torch"]
