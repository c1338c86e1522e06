"""Guards in front of the routes: a request body limit (413), and the overload guard: at
most `max_concurrency` API requests in flight, the rest answered at once with an
OpenAI-shaped 429.

BentoML has the same guard (traffic.max_concurrency) but it answers {"error": "Too many
requests"}, which OpenAI clients cannot parse; and it would count health probes' siblings
the same as generations. The engine queues and batches whatever is admitted, so this is a
ceiling against unbounded memory, not a batching knob. A streaming request counts until
its stream ends."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

def _error(message: str, type: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


BODY = _error("The server is at its maximum number of concurrent requests; retry shortly.", "rate_limit_error", "too_many_requests")


async def _send_error(send: Callable, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or []),
    ]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class BodySizeLimitMiddleware:
    """Refuses a request body over `max_bytes` with an OpenAI-shaped 413, before it is read
    into memory: at once when Content-Length says so, else as soon as the chunks received
    pass the limit (the app then sees a disconnect, and its answer is replaced by the 413)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body = _error(f"The request body is larger than this server accepts ({max_bytes} bytes).",
                           "invalid_request_error", "request_too_large")  # fmt: skip

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, self.body, [(b"connection", b"close")])
            return
        received = 0
        too_large = False
        started = False

        async def limited_receive() -> dict:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if too_large:
                return  # the app's answer to a body it never got whole
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise  # the app's own failure; one it had over a cut-off body is answered below
        if too_large and not started:
            await _send_error(send, 413, self.body, [(b"connection", b"close")])


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
            await _send_error(send, 429, BODY, [(b"retry-after", b"1")])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
