"""The online engine: the step loop runs in its own thread while work exists; each request's
outputs flow to the asyncio loop that added it.

Steps are long CPU or GPU work; running them on the event loop would stall every HTTP
connection, so the loop thread owns the LLMEngine and the event loop only enqueues commands.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Iterator

from engine.config import EngineConfig
from engine.kv_snapshot import kv_snapshot
from engine.llm_engine import EngineDeadError, EngineStats, EngineStepError, LLMEngine, Prompt
from engine.outputs import RequestOutput
from engine.request_streams import FINAL_ONLY, RequestStream, push_all
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError"]

# The longest the step loop waits for the event loops to handle a step's outputs, on CPU. On a
# GPU the step does not run on the readers' cores, and the wait only idled the card: 17% of a
# served run at 16 streams, 27% at 64 (an H200, bench/RESULTS.md 2026-12-04 18:36), so there
# the step loop hands out and goes on.
_MAX_HANDOFF_WAIT_S = 0.02

def _name_os_thread(name: str) -> None:
    """Give the calling thread its name in the OS too (top -H, /proc/<pid>/task/*/comm, perf):
    Python keeps thread names to itself. OpenMP workers started from this thread inherit it, so
    a step's CPU time shows as one group of threads. Linux only; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl (not Linux)
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME: 15 bytes at most


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        """Builds the LLMEngine on the loop thread, which then runs every step: on CPU, torch's
        OpenMP pool belongs to the thread that first runs a parallel op, and a second such
        thread (one that loaded the model, another that steps) leaves libgomp with more threads
        than cores, where its workers stop spinning between parallel regions and sleep; each op
        then pays a futex wake-up (measured: steps 20-30% slower on 2 cores)."""
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopped = False
        self._dead: BaseException | None = None
        self._handoff_seconds = 0.0  # EngineStats.step_handoff_seconds
        self._handoff_wait_s = _MAX_HANDOFF_WAIT_S  # 0 once the engine is built on a GPU
        built = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._build_and_loop, args=(config, kwargs, built, failure), name="bento-llm-engine", daemon=True
        )
        self._thread.start()
        built.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.model_name = self.engine.model_name

    @property
    def is_dead(self) -> bool:
        """The step loop died of a bug; no request can run until the engine is rebuilt."""
        return self._dead is not None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *,
                    stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Validate at once (ValueError says what to change), then stream cumulative outputs:
        every EngineConfig.stream_interval tokens, or with stream=False (a caller that wants
        only the final output) the first and the last. Leaving the stream early aborts the request."""
        if self._dead is not None or self._stopped:
            raise EngineDeadError(f"the engine is not running: {self._dead!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use; use a unique id")
        seq = self.engine.make_sequence(request_id, prompt, params)
        if seq.grammar_future is not None:  # the loop starts the request once its grammar compiled
            seq.grammar_future.add_done_callback(lambda _: self._wakeup.set())
        reader = RequestStream(asyncio.get_running_loop(), self.config.stream_interval if stream else FINAL_ONLY)
        self._streams[request_id] = reader
        self._commands.put(("add", seq))
        self._wakeup.set()
        if self._dead is not None:  # died while this request was being made: nobody will run it
            self._streams.pop(request_id, None)
            raise EngineDeadError(f"the engine is not running: {self._dead!r}")
        return self._iterate(request_id, reader)

    async def _iterate(self, request_id: str, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.next()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request's blocks are freed before the next step runs."""
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(("abort", request_id))
            self._wakeup.set()

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile (or find cached) the request's grammar without blocking the event loop or the
        step loop; ValueError if it cannot compile. Requests added after this start at once."""
        if params.structured_outputs is not None:
            await asyncio.wrap_future(self.engine.grammars.submit(params.structured_outputs))

    def stats(self) -> EngineStats:
        return dataclasses.replace(self.engine.stats(), step_handoff_seconds=self._handoff_seconds)

    async def kv_snapshot(self) -> dict:
        """The KV cache block by block (engine/kv_snapshot.py), taken by the loop between steps."""
        if self._dead is not None or self._stopped:
            raise EngineDeadError(f"the engine is not running: {self._dead!r}")
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("snapshot", answer))
        self._wakeup.set()
        # Bounded: a loop that died just after the queue was drained for the last time never answers.
        return await asyncio.wait_for(asyncio.wrap_future(answer), timeout=60)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.engine.apply_chat_template(messages)

    async def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join, 30)
        if not self._thread.is_alive():  # never while a step may still be talking to the ranks
            self.engine.runner.shutdown()  # tensor-parallel workers, if any

    # ---- the loop thread ---------------------------------------------------------------------
    def _build_and_loop(self, config, kwargs: dict, built: threading.Event, failure: list) -> None:
        _name_os_thread(self._thread.name)
        try:
            self.engine = LLMEngine(config, **kwargs)
            if self.engine.config.device != "cpu":
                self._handoff_wait_s = 0.0
        except BaseException as e:  # raised again by __init__, in the caller's thread
            failure.append(e)
            return
        finally:
            built.set()
        self._loop()

    def _pending_commands(self) -> Iterator[tuple[str, Any]]:
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _drain_commands(self) -> None:
        for kind, arg in self._pending_commands():
            if kind == "snapshot":
                try:
                    arg.set_result(kv_snapshot(self.engine))
                except Exception as e:  # noqa: BLE001 - the dashboard's problem, not the loop's
                    arg.set_exception(e)
            elif kind == "add":
                seq: Sequence = arg
                if seq.request_id in self._streams:  # not aborted while queued
                    self.engine.add_sequence(seq)
            else:
                self.engine.discard_request(arg)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                try:
                    outputs = self.engine.step()
                    errors: dict[str, BaseException] = {}
                except EngineStepError as e:
                    # Failed requests get their own error; the engine and the others go on.
                    outputs, errors = e.outputs, e.errors
                self._deliver(outputs, errors)
        except BaseException as e:  # not pinned to any request: the engine is dead
            logger.exception("engine loop died")
            self._dead = e
            self._discard_all()  # before the errors go out: a failed request holds no block
            dead = EngineDeadError(f"the engine loop died: {e!r}")
            self._deliver([], dict.fromkeys(self._streams, dead))
            self._streams.clear()
        finally:
            self._discard_all()
            self._fail_pending_snapshots()

    def _deliver(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        """Hands a step's errors and outputs to their streams with one wake-up per event loop
        (not one per request): each wake-up is a context switch that, on a small CPU, takes a
        core from the step's OpenMP threads and the GIL from its Python."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput | BaseException]]] = {}
        rids: dict[asyncio.AbstractEventLoop, list[str]] = {}
        # Errors first: a request that failed ends with its error, whatever output it also has.
        for rid, item in (*errors.items(), *((out.request_id, out) for out in outputs)):
            stream = self._streams.get(rid)
            if stream is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                self._streams.pop(rid, None)  # pop: abort() may have taken it meanwhile
            elif not stream.due(item):
                continue
            batches.setdefault(stream.loop, []).append((stream, item))
            rids.setdefault(stream.loop, []).append(rid)
        start = time.perf_counter()
        handled: list[Any] = []  # one held lock per loop, released once the loop handled its items
        for loop, items in batches.items():
            lock = threading.Lock() if self._handoff_wait_s else None
            try:
                if lock is not None:
                    lock.acquire()
                loop.call_soon_threadsafe(push_all, loop, items, lock)
                if lock is not None:
                    handled.append(lock)
            except RuntimeError:  # the loop is closed: nobody awaits these streams any more
                for rid in rids[loop]:
                    self._streams.pop(rid, None)
                    self.engine.discard_request(rid)
        # On CPU the next step starts once the readers have handled this one's outputs (or after a
        # bound, for a loop that is busy elsewhere), so that they do not run during it: there
        # the readers' thread takes a core from a thread of the step's barriers on a small CPU,
        # and the GIL from the step's Python (scheduling, inputs, sampling). The decode layers,
        # one DecoderStack call, run without the GIL (torch releases it around a custom class's
        # method), yet at one request on 2 vCPUs neither handing out without waiting nor
        # handing out as the next step enters its layers was faster, interleaved request by
        # request in one server (bench/RESULTS.md, 16serve1): most of the wait is the wake-ups
        # and the socket write, which a reader running during the step costs it as well.
        deadline = start + self._handoff_wait_s
        for lock in handled:
            lock.acquire(timeout=max(0.0, deadline - time.perf_counter()))
        self._handoff_seconds += time.perf_counter() - start

    def _fail_pending_snapshots(self) -> None:
        for kind, arg in self._pending_commands():
            if kind == "snapshot":
                arg.set_exception(EngineDeadError(f"the engine is not running: {self._dead!r}"))

    def _discard_all(self) -> None:
        for rid in list(self.engine.requests):
            try:
                self.engine.discard_request(rid)
            except Exception:  # noqa: BLE001 - the engine is going away; free what can be freed
                logger.exception("could not free request %s", rid)
