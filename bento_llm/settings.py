"""Server settings: BentoML arguments (`bentoml serve --arg k=v`) over environment variables
(`BENTO_LLM_K`) over defaults, in one pydantic-settings model.

The model is the engine's (engine/settings.py: every EngineConfig field, with no list of them
here) plus the server's own fields, so `--arg` values (always strings) and environment values are
coerced and validated in one place, and a typo in an argument name fails at start-up instead of
being silently ignored.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping

from pydantic import ByteSize, Field, SecretStr, ValidationError, field_validator

from engine.settings import ENV_PREFIX, EngineSettings, settings_error


class Settings(EngineSettings):
    """Every server setting: the engine's, and these. Each can be given as `--arg NAME=VALUE`
    or as the environment variable `BENTO_LLM_<NAME upper-cased>`; arguments win."""

    # The name clients put in "model"; defaults to the Hub id or the model's last path component.
    served_model_name: str | None = None
    # When set, /v1/*, the BentoML endpoints and the dashboard's data need "Authorization: Bearer <api_key>".
    api_key: SecretStr | None = None
    # Requests in flight before BentoML answers 429. The engine queues and batches on its
    # own, so this is an overload guard, not a batching knob: keep it well above max_num_seqs.
    max_concurrency: int = Field(default=256, ge=1)
    # Larger request bodies are refused with 413 before they are read; accepts "4MiB".
    # Big enough for a batch of full-context prompts; small enough that one request cannot
    # hold the tokenizer (and memory) for long.
    max_request_bytes: ByteSize = Field(default=ByteSize(4 * 2**20), ge=1024)
    # How tool calls are read from the model's output (chat requests with `tools`): "auto" picks
    # the format the chat template teaches (<tool_call> -> hermes, [TOOL_CALLS] -> mistral,
    # <|python_tag|> -> llama3_json); "none" refuses tools.
    tool_call_parser: Literal["auto", "none", "hermes", "llama3_json", "mistral"] = "auto"
    # <think>...</think> -> message.reasoning_content. "auto": on where the chat template
    # mentions <think> (Qwen3, QwQ, DeepSeek-R1 distills), off elsewhere.
    reasoning_parser: Literal["auto", "none", "think"] = "auto"
    # Seconds before BentoML gives up on a request that has not started its response;
    # a non-streaming generation answers only at the end, so this must cover the longest one.
    timeout: float = Field(default=3600.0, gt=0)
    # BentoML's HTTP tracing (OpenTelemetry) opens a span for every message a response sends,
    # sampled or not (BentoML samples none by default): on a token stream one per token per
    # request, ~30-80 us of the event loop each (a stream's token events now go past it, see
    # bento_llm/direct_send.py; its start and end still do). So the generation routes stay out of it unless
    # this is true; set it where BentoML's tracing exports traces and those routes belong in them.
    trace_generation: bool = False

    @field_validator("api_key", "served_model_name", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def model_name(self) -> str:
        """The public model id."""
        from engine.loader import hub_model_named

        if self.served_model_name:
            return self.served_model_name
        hub = hub_model_named(self.model)
        if hub is not None:
            return hub.repo_id  # as every OpenAI-compatible server names a Hub model
        return os.path.basename(os.path.normpath(self.model)) or self.model


def load_settings(arguments: Mapping[str, Any] | None = None) -> Settings:
    """BentoML arguments (which win) over BENTO_LLM_* environment variables."""
    try:
        return Settings(**{key.replace("-", "_"): value for key, value in (arguments or {}).items()})
    except ValidationError as e:
        raise settings_error(e) from None


__all__ = ["ENV_PREFIX", "Settings", "load_settings"]
