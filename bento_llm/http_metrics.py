"""Bounded labels for BentoML's own HTTP metrics.

BentoML's traffic-metrics middleware labels every request with its raw path, so requests
to random paths (anyone can send them: /metrics and 404s need no key) add label sets to
/metrics without bound, and a `%00` path writes a NUL byte into it. The middleware is the
outermost one and reads the path before any middleware of ours runs, so the fix replaces
its class (looked up when BentoML builds the app) with one that shows it a bounded label
and hands the app the real path."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

logger = logging.getLogger("bento_llm")

OTHER = "/{other}"  # the one label every path outside the known routes shares
_RAW_PATH = "bento_llm.raw_path"


def path_label(path: str, known: frozenset[str], prefixes: Iterable[tuple[str, str]] = ()) -> str:
    """The path itself when it is a known route; a template for parametrized routes
    (prefix -> label); OTHER for anything else."""
    if path in known:
        return path
    for prefix, label in prefixes:
        if path.startswith(prefix):
            return label
    return OTHER


class _RestorePath:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if _RAW_PATH in scope:
            scope = {**scope, "path": scope[_RAW_PATH]}
            del scope[_RAW_PATH]
        await self.app(scope, receive, send)


def bound_bentoml_path_labels(known: Iterable[str], prefixes: Iterable[tuple[str, str]] = ()) -> bool:
    """Install the bounded-label middleware in BentoML; False (with a warning) when this
    BentoML has no such middleware to replace."""
    try:
        from bentoml._internal.server.http import instruments
    except ImportError:
        instruments = None
    base = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if base is None:
        logger.warning("this BentoML has no RunnerTrafficMetricsMiddleware: HTTP metric labels are not bounded")
        return False
    if getattr(base, "bounded_labels", False):
        return True
    known_paths, label_prefixes = frozenset(known), tuple(prefixes)

    class BoundedLabelsMiddleware(base):  # type: ignore[misc, valid-type]
        bounded_labels = True

        def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(_RestorePath(app), *args, **kwargs)

        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            path = scope.get("path")
            if scope.get("type") in ("http", "websocket") and isinstance(path, str):
                label = path_label(path, known_paths, label_prefixes)
                if label != path:
                    scope = {**scope, "path": label, _RAW_PATH: path}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedLabelsMiddleware
    return True
