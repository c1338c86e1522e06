"""The engine requests behind one HTTP request: started together, read as one stream of
(prompt index, output) with their latency metrics, aborted together on every way out that is
not their natural end (client disconnect, error, BentoML's timeout, a failing sibling)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from bento_llm.metrics import RequestTimer
from bento_llm.runtime import LLMRuntime
from bento_llm.streaming import close_stream, merge_streams

logger = logging.getLogger("bento_llm")


def buffered(params: Any) -> bool:
    """Whether a stream can only be sent at the end. With best_of > n the engine reports the
    n best samples so far, and which sample is "choice 0" changes from step to step; beam
    search reports only its final beams. Neither can be sent as increments."""
    return bool(params.use_beam_search or (params.best_of or params.n) > params.n)


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # for echo; decoded lazily when the prompt came as ids


@dataclass
class Job:
    """The engine requests of one HTTP request, and their bookkeeping."""

    runtime: LLMRuntime
    request_ids: list[str]
    streams: list[AsyncIterator[Any]] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)
    timers: list[RequestTimer] = field(default_factory=list)

    def abort_unfinished(self) -> None:
        engine = self.runtime.engine
        for i, request_id in enumerate(self.request_ids[: len(self.streams)]):
            if i in self.finished:
                continue
            self.finished.add(i)
            self.timers[i].finished("abort")
            if engine is not None:
                try:
                    engine.abort(request_id)
                except Exception:  # noqa: BLE001 - aborting a request that just ended is harmless
                    logger.debug("abort %s failed", request_id, exc_info=True)

    async def close(self) -> None:
        self.abort_unfinished()
        for stream in self.streams:
            await close_stream(stream)

    async def outputs(self) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, cumulative RequestOutput) as they come, with metrics."""
        async for index, output in merge_streams(self.streams):
            timer = self.timers[index]
            timer.tokens_seen(sum(o.num_token_ids for o in output.outputs))
            if output.finished:
                self.finished.add(index)
                reasons = [o.finish_reason for o in output.outputs]
                timer.finished("length" if "length" in reasons else (reasons[0] if reasons else None))
            yield index, output

    async def final_outputs(self) -> list[Any]:
        finals: list[Any] = [None] * len(self.streams)
        async for index, output in self.outputs():
            finals[index] = output
        return finals
