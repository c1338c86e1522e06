"""The live dashboard: a page at /dashboard and the JSON it polls, /dashboard/state.

The page is one static HTML file (bento_llm/static/dashboard.html: inline CSS and JS, nothing
loaded from elsewhere, no build step). The state is the engine's KV snapshot (block by block,
taken between steps: engine/kv_snapshot.py) and a timeline of the last minutes that a
background thread samples once a second, so the history is there when someone opens the page.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from starlette.responses import HTMLResponse, JSONResponse

PAGE = Path(__file__).parent / "static" / "dashboard.html"
SAMPLE_INTERVAL_S = 1.0
HISTORY_S = 300
# However many pages are open, the engine takes at most one snapshot per this many seconds
# (5 ms on its thread for 32k blocks).
SNAPSHOT_MAX_AGE_S = 0.5


class Timeline:
    """Once a second: the engine's counters and the latency sums; the page gets per-interval
    rates (output tokens/s, mean TTFT and inter-token latency of the interval, hit rate)."""

    def __init__(self, stats: Callable[[], Any | None], latency_totals: Callable[[], dict[str, float]]) -> None:
        self.stats = stats
        self.latency_totals = latency_totals
        self.samples: deque[dict[str, float]] = deque(maxlen=int(HISTORY_S / SAMPLE_INTERVAL_S) + 1)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bento-llm-timeline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def sample(self) -> None:
        stats = self.stats()
        if stats is None:
            return
        sample = {
            "time": time.time(),
            "generation_tokens": stats.generation_tokens,
            "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "num_preemptions": stats.num_preemptions,
            "kv_blocks_used": stats.num_kv_blocks_used,
            **self.latency_totals(),
        }
        with self.lock:
            self.samples.append(sample)

    def series(self) -> list[dict[str, float | None]]:
        with self.lock:
            samples = list(self.samples)
        points = []
        for before, after in zip(samples, samples[1:]):
            seconds = after["time"] - before["time"]

            def delta(key: str) -> float:
                return after[key] - before[key]

            points.append({
                "time": after["time"],
                "tokens_per_s": delta("generation_tokens") / seconds if seconds > 0 else 0.0,
                "ttft_s": delta("ttft_sum") / delta("ttft_count") if delta("ttft_count") else None,
                "itl_s": delta("itl_sum") / delta("itl_count") if delta("itl_count") else None,
                "prefix_hit_rate": delta("prefix_cache_hits") / delta("prefix_cache_queries")
                if delta("prefix_cache_queries") else None,
                "preemptions": delta("num_preemptions"),
                "kv_blocks_used": after["kv_blocks_used"],
            })  # fmt: skip
        return points


def create_dashboard_app(get_runtime: Callable[[], Any | None]) -> FastAPI:
    app = FastAPI(title="bento-llm dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    latest: dict[str, Any] = {}  # the last snapshot, shared by every open page

    async def snapshot(engine: Any) -> dict[str, Any]:
        if latest.get("engine") is not engine or time.monotonic() - latest["at"] > SNAPSHOT_MAX_AGE_S:
            latest.update(engine=engine, at=time.monotonic(), snapshot=await engine.kv_snapshot())
        return latest["snapshot"]

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/state")
    async def state() -> JSONResponse:
        runtime = get_runtime()
        if runtime is None or not runtime.ready:
            error = runtime.error if runtime is not None else None
            return JSONResponse({"ready": False, "error": error}, status_code=503)
        return JSONResponse({
            "ready": True,
            "model": runtime.model_name,
            "kv": await snapshot(runtime.engine),
            "history": runtime.timeline.series(),
        }, headers={"Cache-Control": "no-store"})  # fmt: skip

    return app
