"""Plumbing between engine streams and HTTP: server-sent events, merging several
request streams, and aborting work whose client has gone away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from bento_llm.direct_send import DIRECT_SEND
from bento_llm.formatting import chunk

logger = logging.getLogger("bento_llm")

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


# json.dumps(..., ensure_ascii=False) builds an encoder per call; this one is built once.
_encode = json.JSONEncoder(ensure_ascii=False).encode


def sse(payload: str | dict[str, Any]) -> str:
    """One server-sent event, the way OpenAI frames them."""
    data = payload if isinstance(payload, str) else _encode(payload)
    return f"data: {data}\n\n"


class ChunkEvents:
    """The server-sent events of one streamed response, byte for byte what
    `sse(chunk(...))` gives, at a fraction of the cost per token: every chunk of a stream has
    the same envelope (id, object, created, model, usage: null), so it is serialized once, and
    the most common choice, a chat content delta, is a template with the text filled in."""

    def __init__(self, object_name: str, response_id: str, created: int, model: str, include_usage: bool) -> None:
        self._envelope = (object_name, response_id, created, model)
        text = _encode(chunk(*self._envelope, [], include_usage))
        # The envelope's strings come before "choices" and are escaped, so the last match is it.
        head, _, tail = text.rpartition('"choices": []')
        self._head, self._tail = f'data: {head}"choices": [', f"]{tail}\n\n"

    def event(self, choices: list[dict[str, Any]]) -> str:
        return self._head + ", ".join([_encode(c) for c in choices]) + self._tail

    def content(self, index: int, text: str) -> str:
        """event([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])"""
        return f'{self._head}{{"index": {index}, "delta": {{"content": {_encode(text)}}}, "logprobs": null, "finish_reason": null}}{self._tail}'

    def usage(self, usage: dict[str, int]) -> str:
        """The last chunk when the client asked for usage: no choices, the token counts."""
        return sse(chunk(*self._envelope, [], True, usage))


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, at once, and sends the events
    between its start and its end past the middlewares (bento_llm/direct_send.py).

    Starlette stops iterating when the client disconnects (or a send fails) but leaves the
    generator to the garbage collector; closing it here runs its `finally`, which aborts
    the engine requests, so their KV blocks come back within one engine step.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)
        self._direct_send: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self._direct_send = scope.get(DIRECT_SEND)
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        send_event = self._direct_send or send
        async for event in self.body_iterator:
            body = event.encode() if isinstance(event, str) else event
            await send_event({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as (index, item), in arrival order."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    end = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
            await queue.put((index, end, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, end, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is end:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_stream(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection. Only call it after the body has
    been read: from then on the only message the server can receive is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(
    request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]
) -> T:
    """Await `work`; if the client goes away first, cancel it, call `on_disconnect`
    (which aborts the engine requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # e.g. BentoML's request timeout
        task.cancel()
        on_disconnect()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    on_disconnect()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected()
