"""What the AsyncEngine's step loop hands each request's reader (engine/async_engine.py): the
newest cumulative output, woken once per step for all of an event loop's readers, and only as
often as the request wants its outputs."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from engine.outputs import RequestOutput

# A non-streaming request's interval: only its final output matters (the first is handed over
# too, for time to first token), so the step loop does not wake its reader every step.
FINAL_ONLY = sys.maxsize


class RequestStream:
    """One request's newest output, or the error that ended it, for the coroutine reading it.

    Outputs are cumulative (all text and tokens so far), so a reader that lags a few steps
    loses nothing by reading only the newest: it sends the steps' tokens as one increment.
    `item` and `waiter` live on the stream's event loop; `interval` (stream_interval, or
    FINAL_ONLY) and `handed_tokens` are the step loop's, which decides what it hands over."""

    __slots__ = ("loop", "item", "waiter", "interval", "handed_tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: int) -> None:
        self.loop = loop
        self.item: RequestOutput | BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.interval = interval
        self.handed_tokens = 0

    def due(self, output: RequestOutput) -> bool:
        """Hand this output over? The first tokens (and any output before them), the last, and
        every output at interval 1; else once `interval` more tokens (of its longest sequence) came."""
        if self.interval == 1 or output.finished:
            return True
        tokens = max((o.num_token_ids for o in output.outputs), default=0)
        if self.handed_tokens and tokens - self.handed_tokens < self.interval:
            return False
        self.handed_tokens = tokens
        return True

    def push(self, item: RequestOutput | BaseException) -> None:
        self.item = item
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self) -> RequestOutput | BaseException:
        while self.item is None:
            self.waiter = self.loop.create_future()
            await self.waiter
        item, self.item = self.item, None
        return item


def push_all(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestStream, RequestOutput | BaseException]],
             handled: Any | None) -> None:
    """On `loop`: a step's items to their streams, one call for all of them (one wake-up)."""
    for stream, item in items:
        stream.push(item)
    # Queued behind the readers these pushes woke: runs once each has handled its output.
    # `handled` is a held lock (None: the step loop does not wait), released here: one C call on
    # the loop, where Event.set runs a Condition's Python (profiled: ~20% of the loop's Python time at c=64).
    if handled is not None:
        loop.call_soon(handled.release)
