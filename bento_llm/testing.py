"""A real `bentoml serve` process for tests and benchmarks: started on 127.0.0.1 on a free
port, waited on until /readyz answers, stopped (with its whole process group) at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        args: dict[str, object] | None = None,
        env: dict[str, str] | None = None,
        target: str = "service:BentoLLM",
        cwd: str | os.PathLike = REPO_ROOT,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args or {}
        self.env = env or {}
        self.target = target
        self.cwd = str(cwd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log: IO | None = None

    def start(self) -> "ServerProcess":
        command = [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in self.args.items():
            command += ["--arg", f"{key}={value}"]
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false", **self.env}
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # type: ignore[assignment]
        # Its own process group, so stop() reaches BentoML's worker processes too.
        self.proc = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def status(self, path: str) -> int | None:
        try:
            return httpx.get(self.url + path, timeout=2).status_code
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}; log: {self.log_tail()}")
            if self.status("/readyz") == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s; log: {self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return "(no log)"
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()  # type: ignore[union-attr]
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, comment lines dropped."""
    text = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float | None:
    """The value of `name` whose labels include `labels` (summed when several match)."""
    found = None
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            found = (found or 0.0) + value
    return found
