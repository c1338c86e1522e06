"""The in-process server the API tests share: a loaded LLMRuntime over a real tiny engine, a
TestClient on the /v1 app (and the root app with /tokenize), and the check that a test left no
request behind."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Iterator

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from bento_llm.app import create_app, create_root_app
from bento_llm.runtime import LLMRuntime
from bento_llm.settings import Settings


@contextlib.contextmanager
def loaded_runtime(model: str, **settings) -> Iterator[LLMRuntime]:
    runtime = LLMRuntime(Settings(model=model, **{"num_kv_blocks": 64, **settings}))
    runtime.load()
    assert runtime.ready, runtime.error
    try:
        yield runtime
    finally:
        asyncio.run(runtime.shutdown())


@contextlib.contextmanager
def app_client(runtime: LLMRuntime) -> Iterator[TestClient]:
    app = Starlette(routes=[Mount("/v1", create_app(lambda: runtime)), Mount("/", create_root_app(lambda: runtime))])
    with TestClient(app) as client:
        yield client


def assert_no_request_left(runtime: LLMRuntime) -> None:
    deadline = time.monotonic() + 5
    while runtime.engine.stats().num_kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = runtime.engine.stats()
    assert stats.num_kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0, stats
