"""The overload guard: at most `max_concurrency` API requests in flight, the rest answered
at once with an OpenAI-shaped 429.

BentoML has the same guard (traffic.max_concurrency) but it answers {"error": "Too many
requests"}, which OpenAI clients cannot parse; and it would count health probes' siblings
the same as generations. The engine queues and batches whatever is admitted, so this is a
ceiling against unbounded memory, not a batching knob. A streaming request counts until
its stream ends."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

BODY = json.dumps(
    {
        "error": {
            "message": "The server is at its maximum number of concurrent requests; retry shortly.",
            "type": "rate_limit_error",
            "param": None,
            "code": "too_many_requests",
        }
    }
).encode()


class ConcurrencyLimitMiddleware:
    def __init__(self, app: Any, max_concurrency: int, prefixes: Iterable[str] = ("/v1",), paths: Iterable[str] = ()) -> None:
        self.app = app
        self.max_concurrency = max_concurrency
        self.prefixes = tuple(p.rstrip("/") for p in prefixes)
        self.paths = frozenset(paths)
        self.in_flight = 0  # one event loop: no lock needed

    def limits(self, path: str) -> bool:
        return path in self.paths or any(path == p or path.startswith(p + "/") for p in self.prefixes)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.limits(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode()), (b"retry-after", b"1"),
            ]})  # fmt: skip
            await send({"type": "http.response.body", "body": BODY})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
