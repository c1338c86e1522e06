"""One real `bentoml serve` of the default tiny model that the server test modules share
(tests/test_server.py, test_server_integrity.py, test_dashboard.py): a server start is ~12 s
quiet and these modules need nothing of one that the others would disturb.

It serves tests/fault_service.py: the real service, whose injected faults fire only for a request
that asks for one by a marker among its stop strings. A test that kills the engine takes the
server for itself (`take`); whoever asks next gets a fresh one, whatever order tests run in.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from bento_llm.testing import ServerProcess

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
NUM_KV_BLOCKS = 128
SERVED_MODEL_NAME = "tiny"


class SharedServer:
    def __init__(self, model: str, directory: Path) -> None:
        self.model = model
        self._directory = directory
        self._started = 0
        self._server: ServerProcess | None = None

    def get(self) -> ServerProcess:
        """The shared server, started on first use (or after a test took the last one)."""
        if self._server is None:
            self._started += 1
            logs = self._directory / f"server-{self._started}"
            logs.mkdir()
            server = ServerProcess(
                args={"model": self.model, "served_model_name": SERVED_MODEL_NAME, "num_kv_blocks": NUM_KV_BLOCKS},
                env={"BENTO_LLM_API_KEY": KEY, "BENTOML_HOME": str(logs / "bentoml-home")},
                target="tests.fault_service:BentoLLM",
                log_path=logs / "serve.log",
            )
            self._server = server.__enter__()
        return self._server

    @contextlib.contextmanager
    def take(self) -> Iterator[ServerProcess]:
        """The shared server for one test that breaks it; stopped after, never handed out again."""
        server = self.get()
        self._server = None
        try:
            yield server
        finally:
            server.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
