"""Token messages of a stream sent past the middleware stack.

Every ASGI message a response sends goes down through each middleware's `send` wrapper:
BentoML's traffic metrics, access log, tracing, timeout and concurrency guards, ours, and
Starlette's exception handlers on both the outer app and the mounted one. On a token stream
that is one trip per token per request, on the event loop, while the engine waits for it to
hand the step's outputs out. None of them looks at a body message that has more to follow:
they act on the response's start (status, headers) and on its last body message (the request's
count, duration and access-log line). So the outermost middleware puts the `send` it was given
into the scope, and a stream sends its start and its last message down the stack as usual and
the messages between straight to that `send`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

logger = logging.getLogger("bento_llm")

DIRECT_SEND = "bento_llm.direct_send"  # the scope key


class DirectSendMiddleware:
    """Outermost: records the server's `send` for the responses inside (see the module doc)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            scope[DIRECT_SEND] = send
        await self.app(scope, receive, send)


def install_direct_send() -> bool:
    """Put DirectSendMiddleware outermost in the apps BentoML builds for services; False (with a
    warning, streams then take the whole stack) when this BentoML builds them elsewhere."""
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
        from starlette.middleware import Middleware
    except ImportError:
        ServiceAppFactory = None
    middlewares = getattr(ServiceAppFactory, "middlewares", None)
    if not isinstance(middlewares, property):
        logger.warning("this BentoML builds its app elsewhere: stream messages go through every middleware")
        return False
    if getattr(middlewares.fget, "direct_send", False):
        return True

    def with_direct_send(self: Any) -> list[Any]:
        return [Middleware(DirectSendMiddleware), *middlewares.fget(self)]

    with_direct_send.direct_send = True  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(with_direct_send)
    return True
