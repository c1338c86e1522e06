"""Fixtures shared by the engine tests, and the rule that no test leaks a KV block."""

from __future__ import annotations

import weakref

import pytest

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


def assert_all_blocks_free(engine) -> None:
    usage = engine.kv_cache_usage()
    assert usage.num_used_blocks == 0 and usage.num_free_blocks == usage.num_blocks, usage
