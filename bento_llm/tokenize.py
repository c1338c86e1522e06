"""POST /tokenize and POST /detokenize, in vLLM's shapes: a prompt or chat messages (through the
chat template, tools included) to token ids, and token ids back to text. Served at the root of
the server, where vLLM has them, behind the API key like /v1."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from bento_llm.chat import apply_chat_template
from bento_llm.errors import bad_request
from bento_llm.protocol import ChatCompletionRequest, ChatMessage, ChatTool, _Request
from bento_llm.runtime import LLMRuntime


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the template writes the special tokens itself
    return_token_strs: bool | None = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def tokenize_request_model(body: Any) -> type[_Request]:
    """Which of the two shapes a body is: vLLM tells them apart by `messages`."""
    return TokenizeChatRequest if isinstance(body, dict) and "messages" in body else TokenizeCompletionRequest


def _tokenize(runtime: LLMRuntime, request: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
    tokenizer = runtime.tokenizer
    if isinstance(request, TokenizeChatRequest):
        if request.continue_final_message and request.add_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message")
        chat = ChatCompletionRequest.model_construct(
            messages=request.messages, add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message, chat_template_kwargs=request.chat_template_kwargs,
        )  # fmt: skip
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        text = apply_chat_template(tokenizer, chat, tools)
    else:
        text = request.prompt
    ids = list(tokenizer.encode(text, add_special_tokens=request.add_special_tokens))
    strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return {"count": len(ids), "max_model_len": runtime.max_model_len, "tokens": ids, "token_strs": strs}


async def tokenize(runtime: LLMRuntime, request: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
    runtime.require_engine()
    return await asyncio.to_thread(_tokenize, runtime, request)  # megabytes of text take seconds


async def detokenize(runtime: LLMRuntime, request: DetokenizeRequest) -> dict[str, Any]:
    runtime.require_engine()
    bad = [t for t in request.tokens if not 0 <= t < runtime.vocab_size]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{runtime.vocab_size - 1})", param="tokens")
    return {"prompt": await asyncio.to_thread(runtime.tokenizer.decode, request.tokens)}
