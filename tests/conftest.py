"""Fixtures shared by the engine tests, and the rule that no test leaks a KV block."""

from __future__ import annotations

import os
import weakref

import pytest
import torch

_engines: "weakref.WeakSet" = weakref.WeakSet()


@pytest.fixture(autouse=True)
def every_block_free_after_each_test():
    """After every test that runs requests, every block of every engine it made is free."""
    from engine.llm_engine import LLMEngine

    original_init = LLMEngine.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        _engines.add(self)

    LLMEngine.__init__ = tracking_init
    try:
        yield
    finally:
        LLMEngine.__init__ = original_init
    for engine in list(_engines):
        usage = engine.kv_cache_usage()
        assert usage.num_free_blocks == usage.num_blocks, f"KV blocks leaked: {usage}"
        assert not engine.has_unfinished_requests(), "requests left behind in the scheduler"


@pytest.fixture
def gen() -> torch.Generator:
    """Random inputs drawn fresh every run for kernel tests; the seed is printed (shown on a
    failure) and KERNEL_TEST_SEED=<n> replays it."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"KERNEL_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """The default tiny random Llama (tests/helpers.py), built once for every module that only
    needs some small model; modules that need particular shapes build their own."""
    from tests.helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """tiny_path and its transformers reference model."""
    from tests.helpers import load_hf_reference

    return tiny_path, load_hf_reference(tiny_path)


def assert_all_blocks_free(engine) -> None:
    usage = engine.kv_cache_usage()
    assert usage.num_used_blocks == 0 and usage.num_free_blocks == usage.num_blocks, usage
