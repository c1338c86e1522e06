"""Per-request generation settings, with vLLM's field names and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20
# Ranges where the sampler's float32 arithmetic stays meaningful: below MIN_TEMPERATURE a
# temperature is clamped to it (as vLLM does); above MAX_TEMPERATURE sampling is as good as
# uniform; a repetition penalty outside its range scales logits to inf
# or to 0; a length penalty past MAX_LENGTH_PENALTY overflows length ** penalty.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
MAX_LENGTH_PENALTY = 10.0
_INT64 = (-(2**63), 2**63 - 1)
_SEEDS = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed's range
_INT_FIELDS = ("n", "best_of", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("length_penalty", "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    # Constrained decoding: the output matches a JSON schema, regex, choice or grammar (a dict
    # is read as StructuredOutputsParams' fields).
    structured_outputs: StructuredOutputsParams | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"SamplingParams.structured_outputs has an unknown field: {e}") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"SamplingParams.structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        self._check_types()
        if self.top_k == 0:
            self.top_k = -1
        if 0 < self.temperature < MIN_TEMPERATURE:
            # vLLM's documented clamp: logits divided by a tinier temperature overflow to inf
            # and the softmax turns to NaN.
            self.temperature = MIN_TEMPERATURE
        self._validate()

    def _check_types(self) -> None:
        """Every number is of its type, finite, and fits the int64 / float32 tensors the
        sampler builds, before any range check compares it."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_int(value, *_INT64):
                raise ValueError(f"SamplingParams.{name} must be an integer in [-2**63, 2**63 - 1], got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_finite_number(value):
                raise ValueError(f"SamplingParams.{name} must be a finite number, got {value!r}")
        if self.seed is not None and not _is_int(self.seed, *_SEEDS):
            raise ValueError(f"SamplingParams.seed must be an integer in [-2**63, 2**64 - 1] (what torch's generator takes), got {self.seed!r}")
        if not all(_is_int(t, 0, _INT64[1]) for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be non-negative integer token ids, got {self.stop_token_ids!r}")
        try:
            self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias or {}).items()}
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"SamplingParams.logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        if any(k < 0 or not math.isfinite(v) for k, v in self.logit_bias.items()):
            raise ValueError(f"SamplingParams.logit_bias must map token ids to finite numbers, got {self.logit_bias!r}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be strings, got {self.stop!r}")

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if self.n < 1:
            raise bad("n", "must be at least 1")
        if self.best_of < self.n:
            raise bad("best_of", f"must be at least n ({self.n})")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be non-negative (0 means greedy) and at most {MAX_TEMPERATURE}")
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
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be positive, in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] (1 is none)")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise bad("length_penalty", f"must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}]")
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
        if self.structured_outputs is not None:
            if self.use_beam_search:
                raise ValueError("SamplingParams.structured_outputs is not supported with beam search (use_beam_search)")
            if self.min_tokens:
                raise bad("min_tokens", "must be 0 with structured_outputs (the grammar decides where the output ends)")

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
