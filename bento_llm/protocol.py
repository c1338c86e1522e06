"""The OpenAI wire format (requests and responses) as pydantic models.

Requests are strict (a string is not a number, 1 is not true) and forbid unknown fields,
as OpenAI does: a typo gets a 400 naming it instead of being silently ignored. Fields
OpenAI defines that we cannot honour are accepted by the schema and refused with a 400 in
`check_unsupported`, so the message can say "not supported" rather than "unknown".
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bento_llm.errors import bad_request, unsupported


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    # allow_inf_nan=False: Python's JSON parser (and pydantic's) reads NaN, Infinity and 1e999;
    # no sampling value means anything there, so they are refused at the door.
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=(), allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingRequest(_Request):
    """Fields shared by both endpoints: OpenAI's, then vLLM's extensions."""

    model: str | None = None  # None: the served model
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    user: str | None = None  # accepted and ignored, as an end-user id
    # vLLM's extensions.
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    # OpenAI's output constraint (vLLM takes it on completions too), then vLLM's
    # (bento_llm/structured.py reads them).
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise unsupported("stream_options.continuous_usage_stats")
        if self.prompt_logprobs is not None and self.stream:
            raise unsupported("prompt_logprobs", "prompt_logprobs with stream")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise unsupported("suffix")
        if self.echo and self.logprobs is not None:
            # OpenAI returns the prompt's logprobs with echo; the engine cannot compute them yet.
            raise unsupported("echo", "echo together with logprobs (prompt logprobs)")


class ContentPart(_Request):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    type: str
    text: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant, vLLM's: the reasoning of an earlier turn

    def text(self, index: int) -> str:
        """The message's text; anything but text parts is refused."""
        param = f"messages.[{index}]"
        if self.role == "function":
            raise unsupported(f"{param}.role", "The 'function' role (deprecated; use tools and the 'tool' role)")
        extra = set((self.model_extra or {}).keys()) - {"refusal"}
        if (self.model_extra or {}).get("function_call"):
            raise unsupported(f"{param}.function_call", "function_call (deprecated; use tool_calls)")
        if extra - {"function_call"}:
            field = sorted(extra - {"function_call"})[0]
            raise bad_request(f"Unrecognized message field: {field}", param=f"{param}.{field}")
        if self.tool_calls is not None and self.role != "assistant":
            raise bad_request("Only assistant messages can have tool_calls", param=f"{param}.tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise bad_request("A tool message needs the tool_call_id it answers", param=f"{param}.tool_call_id")
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise bad_request(f"Missing content for the {self.role} message", param=f"{param}.content")
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise unsupported(f"{param}.content.[{j}].type", f"Content of type '{part.type}'")
            pieces.append(part.text)
        return "".join(pieces)


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    # OpenAI fields we accept but ignore: they do not change the result.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields we cannot honour unless left at their neutral value.
    functions: list[Any] | None = None
    function_call: Any | None = None
    modalities: list[str] | None = None
    audio: Any | None = None
    prediction: Any | None = None
    reasoning_effort: str | None = None
    web_search_options: Any | None = None
    # vLLM's chat extensions.
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.prompt_logprobs is not None:
            raise unsupported("prompt_logprobs", "prompt_logprobs in chat (use /v1/completions)")
        if self.functions:
            raise unsupported("functions", "functions (deprecated; use tools)")
        if self.function_call not in (None, "none"):
            raise unsupported("function_call", "function_call (deprecated; use tool_choice)")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise bad_request("tool_choice is only allowed when tools are specified", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.name
            if wanted not in {t.function.name for t in self.tools or []}:
                raise bad_request(f"tool_choice names the function '{wanted}', which is not in tools", param="tool_choice")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise bad_request("Two tools have the same function name", param="tools")
        if self.modalities is not None and self.modalities != ["text"]:
            raise unsupported("modalities", "Output modalities other than text")
        for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
            if getattr(self, name) is not None:
                raise unsupported(name)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- responses
# The handlers build responses as dicts (cheaper per streamed token); these models are the
# documented shape, shown on /v1/docs. Stream chunks are ChatCompletionChunk / CompletionChunk.


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class ModelCapabilities(_Response):
    """What the served model can do through this server (bento-llm's extension of the model object)."""

    tool_calling: bool  # tools with tool_choice "auto": the chat template has a format a parser reads
    tool_call_parser: str | None
    forced_tool_choice: bool  # tool_choice "required" or a named function
    structured_outputs: bool
    reasoning_parser: str | None  # reasoning_content is filled in


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "bento-llm"
    root: str | None = None
    max_model_len: int | None = None
    capabilities: ModelCapabilities | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's extension: per prompt token, None for the first.
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ResponseFunctionCall(_Response):
    name: str
    arguments: str  # JSON text as the model wrote it; may be invalid JSON (check before use)


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None  # only when the model called tools
    reasoning_content: str | None = None  # only with a reasoning parser


class ChatChoice(_Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(_Response):
    name: str | None = None  # in a call's first delta only
    arguments: str | None = None  # the next piece of the arguments


class DeltaToolCall(_Response):
    index: int
    id: str | None = None  # in a call's first delta only
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """Every error the API answers, whatever its status."""

    error: ErrorDetail
