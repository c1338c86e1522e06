"""Fixtures shared by the engine tests, and the rule that no test leaks a KV block.

The rule: after every test, every engine the test built or drove (add_sequence, step,
abort_request), module- and session-scoped fixtures' engines included, has every device and
CPU block free and no request left. Engines are held strongly from their creation until the
check after the test that made them has run (a test's local engine would otherwise be collected
first and never looked at); a fixture's engine is checked again after every test that uses it.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import pytest
import torch

# Engines built since the last check, and engines driven since the last check: strong references,
# dropped once the check has run.
_built: list = []
_driven: dict[int, object] = {}
# ids of those engines that were built or driven on a thread other than the main one (an
# AsyncEngine's): only they can still be freeing blocks after the test returned.
_off_main_thread: set[int] = set()
_lock = threading.Lock()
# An AsyncEngine frees a finished request's blocks on its own thread, a moment after the client
# saw the last token: how long the check waits for that before calling it a leak. An engine only
# the main thread touched is checked once, without waiting (nothing else could free its blocks).
_SETTLE_S = 5.0


def _track(method, registry_add):
    @functools.wraps(method)
    def tracked(self, *args, **kwargs):
        registry_add(self)
        return method(self, *args, **kwargs)

    return tracked


def _add_built(engine) -> None:
    with _lock:
        _built.append(engine)
        _note_thread(engine)


def _add_driven(engine) -> None:
    with _lock:
        _driven[id(engine)] = engine
        _note_thread(engine)


def _note_thread(engine) -> None:
    if threading.current_thread() is not threading.main_thread():
        _off_main_thread.add(id(engine))


@pytest.fixture(scope="session", autouse=True)
def engines_are_tracked():
    """Patch LLMEngine before any fixture can build one, for the whole session."""
    from engine.llm_engine import LLMEngine

    originals = {name: getattr(LLMEngine, name) for name in ("__init__", "add_sequence", "step", "abort_request")}
    LLMEngine.__init__ = _track(originals["__init__"], _add_built)
    for name in ("add_sequence", "step", "abort_request"):
        setattr(LLMEngine, name, _track(originals[name], _add_driven))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(LLMEngine, name, method)


def leaks(engine) -> str | None:
    """What the engine still holds, or None when every block is free and no request is left.
    (__init__ may have failed half way: an engine without a block manager holds nothing.)"""
    if getattr(engine, "scheduler", None) is None:
        return None
    usage, swapped = engine.block_manager.usage(), engine.cpu_block_manager.usage()
    problems = []
    if usage.num_free_blocks != usage.num_blocks or usage.num_used_blocks:
        problems.append(f"KV blocks leaked: {usage}")
    if swapped.num_free_blocks != swapped.num_blocks or swapped.num_used_blocks:
        problems.append(f"CPU swap blocks leaked: {swapped}")
    if engine.has_unfinished_requests() or engine.requests:
        problems.append(f"requests left behind: {sorted(engine.requests)}")
    return "; ".join(problems) or None


@pytest.fixture(autouse=True)
def every_block_free_after_each_test(engines_are_tracked):
    """After every test, every engine it built or drove holds no block and no request."""
    yield
    with _lock:
        engines = list({id(e): e for e in [*_built, *_driven.values()]}.values())
        settling = {id(e) for e in engines} & _off_main_thread
        _built.clear()
        _driven.clear()
        _off_main_thread.clear()
    failures = []
    for engine in engines:
        deadline = time.monotonic() + (_SETTLE_S if id(engine) in settling else 0.0)
        while True:
            try:
                problem = leaks(engine)
            except RuntimeError as e:  # read while an AsyncEngine's thread was changing it
                problem = repr(e)
            if problem is None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if problem is not None:
            failures.append(problem)
    del engines
    assert not failures, "\n".join(failures)


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


@pytest.fixture(scope="session")
def default_float32_llm():
    """The default model in float32 (its exact mode against transformers), one engine for every
    module that needs just that: a default-model load is ~3-5 s a module. Tests must leave it as
    they found it (the leak check after each test says so)."""
    from engine import DEFAULT_MODEL, LLM

    return LLM(DEFAULT_MODEL, dtype="float32", num_kv_blocks=256)


@pytest.fixture(scope="session")
def shared_server(tiny_path, tmp_path_factory):
    """The `bentoml serve` of tiny_path the server test modules share (tests/shared_server.py)."""
    from tests.shared_server import SharedServer

    servers = SharedServer(tiny_path, tmp_path_factory.mktemp("shared-server"))
    try:
        yield servers
    finally:
        servers.stop()


def assert_all_blocks_free(engine) -> None:
    usage = engine.kv_cache_usage()
    assert usage.num_used_blocks == 0 and usage.num_free_blocks == usage.num_blocks, usage


# Property tests explore fresh random cases on a developer's machine; CI replays one fixed
# sequence of them, so a submission's result does not depend on the draw.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
