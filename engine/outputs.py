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
    logprobs: list[PositionLogprobs] | None = None
    # "stop" | "length" | "abort" | "error" (the request failed; the engine logged why) | None while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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
