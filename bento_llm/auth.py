"""Bearer-token check in front of the API routes, as a plain ASGI middleware so that it
runs before the body is read (a wrong key gets 401, never a 400 about the body) and does
not buffer streaming responses the way Starlette's BaseHTTPMiddleware would."""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Iterable

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY = "Incorrect API key provided."


def _error_body(message: str, code: str | None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <api_key>` on every path under one of `prefixes`
    or equal to one of `paths`, except the `open_paths` (the API's own docs); everything else
    (health, metrics, docs) stays open."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        prefixes: Iterable[str] = ("/v1",),
        paths: Iterable[str] = (),
        open_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.prefixes = tuple(p.rstrip("/") for p in prefixes)
        self.paths = frozenset(paths)
        self.open_paths = frozenset(open_paths)

    def protects(self, path: str) -> bool:
        if path in self.open_paths:
            return False
        if path in self.paths:
            return True
        return any(path == p or path.startswith(p + "/") for p in self.prefixes)

    def authorized(self, scope: Scope) -> tuple[bool, str | None]:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if not header or scheme.lower() != b"bearer" or not token.strip():
            return False, None
        # Constant time: the comparison does not reveal how much of the key was right.
        ok = hmac.compare_digest(token.strip(), self.key or b"")
        return ok, "invalid_api_key"

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if (
            self.key is None
            or scope["type"] != "http"
            or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
            or not self.protects(scope.get("path", ""))
        ):
            await self.app(scope, receive, send)
            return
        ok, code = self.authorized(scope)
        if ok:
            await self.app(scope, receive, send)
            return
        body = _error_body(WRONG_KEY if code else MISSING_KEY, code)
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="bento-llm"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
