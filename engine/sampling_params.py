"""Per-request generation settings, with vLLM's field names and validation."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1  # completions returned
    best_of: int | None = None  # sequences generated (None: n); the n best by cumulative logprob return
    use_beam_search: bool = False  # beam width is best_of (or n)
    length_penalty: float = 1.0  # beam score = cumulative logprob / generated_length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == 0:
            self.top_k = -1
        if self.best_of is None:
            self.best_of = self.n
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if self.n < 1:
            raise bad("n", "must be at least 1")
        if self.best_of < self.n:
            raise bad("best_of", f"must be at least n ({self.n})")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 (disabled) or at least 1")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise bad(name, f"must be in [0, {MAX_LOGPROBS}]")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", "must be True, False or 'never'")
        if self.use_beam_search:
            self._validate_beam_search(bad)
        else:
            if self.best_of > 1 and self.greedy:
                raise bad("best_of", "must be 1 with greedy sampling (temperature 0): every sample would be equal")
            if self.length_penalty != 1.0:
                raise bad("length_penalty", "only applies to beam search (use_beam_search=True)")
            if self.early_stopping is not False:
                raise bad("early_stopping", "only applies to beam search (use_beam_search=True)")
        if any(not s for s in self.stop):
            raise bad("stop", "must not contain empty strings")
        for bias in self.logit_bias.values():
            if not -100 <= bias <= 100:
                raise bad("logit_bias", "values must be in [-100, 100]")

    def _validate_beam_search(self, bad) -> None:
        if self.best_of < 2:
            raise bad("best_of", "must be at least 2 with beam search (the beam width is best_of, or n)")
        if self.temperature != 0.0:
            raise bad("temperature", "must be 0 with beam search (beams are chosen, not sampled)")
        if self.top_p != 1.0 or self.top_k != -1 or self.min_p != 0.0:
            name = "top_p" if self.top_p != 1.0 else "top_k" if self.top_k != -1 else "min_p"
            raise bad(name, "must be left unset with beam search")
        if self.seed is not None:
            raise bad("seed", "must be left unset with beam search (it draws nothing)")
        if self.stop:
            raise bad("stop", "strings are not applied to beam search; use stop_token_ids")
        if self.logprobs is not None:
            raise bad("logprobs", "are not reported for beam search; read cumulative_logprob")

    @property
    def beam_width(self) -> int:
        return self.best_of if self.use_beam_search else 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
