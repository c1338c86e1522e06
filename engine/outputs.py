"""What the engine hands back: vLLM's RequestOutput and CompletionOutput shapes, and the
engine's counters (LLMEngine.stats)."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: token id -> logprob, the sampled token first, then the top ones.
PositionLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative: everything generated so far
    token_ids: list[int]  # cumulative
    cumulative_logprob: float | None = None
    # None by a factory, not a class attribute: of_sequence_lists' outputs copy it when first read
    # (__getattr__), which a class attribute of that name would shadow.
    logprobs: list[PositionLogprobs] | None = field(default_factory=lambda: None)
    # "stop" | "length" | "abort" | "error" (the request failed; the engine logged why) | None while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of_sequence_lists(cls, index: int, text: str, tokens: list[int], first: int,
                          logprobs: list[PositionLogprobs] | None, **fields) -> CompletionOutput:
        """An output whose token_ids (tokens[first:] as it is now) and logprobs (the list as it is
        now) are copied when first read. Why: a step makes one output per request and most are
        never read (a stream's reader takes only the newest, generate() only the last), while
        the copy grows with the output: ~10-30 us a request a step at 8k tokens, more than the
        rest of a step's host work at 64 sequences. Right because a sequence's token and logprob
        lists are only ever appended to (a fork copies them), so the span stays what it was."""
        out = cls(index, text, [], logprobs=None, **fields)
        del out.token_ids, out.logprobs
        out._spans = {"token_ids": (tokens, first, len(tokens)),
                      "logprobs": None if logprobs is None else (logprobs, 0, len(logprobs))}
        return out

    @property
    def num_token_ids(self) -> int:
        """len(token_ids), without copying an output from of_sequence_lists: a stream's reader
        counts every output it takes (its copy would run on the event loop, every step)."""
        if "token_ids" in self.__dict__:
            return len(self.__dict__["token_ids"])
        _, start, stop = self._spans["token_ids"]
        return stop - start

    def token_ids_since(self, n: int) -> list[int]:
        """token_ids[n:], copying only those (a stream sends the new tokens' logprobs)."""
        return self._since("token_ids", n)

    def logprobs_since(self, n: int) -> list[PositionLogprobs] | None:
        """logprobs[n:] (None without logprobs), copying only those."""
        return self._since("logprobs", n)

    def _since(self, name: str, n: int) -> list | None:
        """self.<name>[n:] (None where it is None), from the copy if one was made, else the span."""
        if name in self.__dict__:
            value = self.__dict__[name]
            return None if value is None else value[n:]
        span = self._spans[name]
        return None if span is None else span[0][span[1] + n : span[2]]

    def __getattr__(self, name: str):
        """token_ids or logprobs of an output from of_sequence_lists, on their first read (only
        attributes not set reach here; the copy is then set, so later reads do not)."""
        spans = self.__dict__.get("_spans")
        if spans is None or name not in spans:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self._since(name, 0)
        setattr(self, name, value)
        # Not kept alive by this output any more; a new dict, as a copy.copy of it shares this one.
        self._spans = {key: other for key, other in spans.items() if key != name}
        return value

@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first.
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    num_kv_blocks: int
    num_kv_blocks_used: int
    kv_cache_usage: float
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens served from cached blocks
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    # Rank 0's resident bytes at start: weights, kv_cache, step_buffers, rss (ModelRunner.memory).
    resident_bytes: dict[str, int] = field(default_factory=dict)
    # AsyncEngine only (0 offline): seconds its step loop waited for the event loops to hand a
    # step's outputs to their streams, the part of the served path no step overlaps.
    step_handoff_seconds: float = 0.0
