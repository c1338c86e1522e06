"""The text stream behind the BentoML-native endpoints (`bentoml.SyncHTTPClient`):
plain text increments instead of OpenAI chunks, same engine, same validation."""

from __future__ import annotations

from typing import Any, AsyncIterator

from pydantic import ValidationError

from bento_llm.errors import OpenAIError, from_validation_error
from bento_llm.jobs import Prompt
from bento_llm.protocol import ChatCompletionRequest, CompletionRequest, random_id
from bento_llm.runtime import LLMRuntime
from bento_llm.serving import OpenAIServing
from bento_llm.sampling import to_sampling_params


def _options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def prepare(runtime: LLMRuntime, prompt: str | None, messages: list[dict[str, Any]] | None, options: dict[str, Any]) -> tuple[Prompt, Any]:
    """Validate as the OpenAI routes do; raises OpenAIError before anything starts.
    Tokenizes: call it off the event loop."""
    serving = OpenAIServing(runtime)
    runtime.require_engine()
    try:
        if messages is not None:
            request: Any = ChatCompletionRequest.model_validate({"messages": messages, **_options(options)}, strict=False)
        else:
            request = CompletionRequest.model_validate({"prompt": prompt or "", **_options(options)}, strict=False)
    except ValidationError as e:
        raise from_validation_error(e) from None
    params = to_sampling_params(request, max_tokens=request.max_tokens, logprobs=None, vocab_size=runtime.vocab_size)
    if messages is not None:
        tokenized, param = serving.chat_prompt(request), "messages"
    else:
        text = prompt or ""
        tokenized, param = Prompt(list(runtime.tokenizer.encode(text, add_special_tokens=True)), text), "prompt"
    if params.n != 1:
        raise OpenAIError("n must be 1 on the streaming text endpoints", param="n")
    serving.check_length(len(tokenized.token_ids), params.max_tokens, param)
    return tokenized, params


async def text_stream(runtime: LLMRuntime, prompt: Prompt, params: Any) -> AsyncIterator[str]:
    """Text increments until the request ends; closing the iterator aborts the request."""
    serving = OpenAIServing(runtime)
    job = serving.start([random_id("gen")], [prompt], params, "prompt", stream=True)
    sent = 0
    try:
        async for _, output in job.outputs():
            text = output.outputs[0].text
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
    finally:
        await job.close()
