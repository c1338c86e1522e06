"""The two OpenAI endpoints over the engine: requests checked, prompts built, engine requests
started (bento_llm/jobs.py), outputs gathered into one response or streamed back as events
(bento_llm/stream_events.py) in OpenAI's shape."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bento_llm import formatting as fmt
from bento_llm.chat import apply_chat_template
from bento_llm.chat_output import OutputParser, finish_reason, message_body
from bento_llm.errors import OpenAIError, bad_request, context_length_exceeded, from_value_error, model_not_found
from bento_llm.jobs import Job, Prompt, buffered
from bento_llm.protocol import ChatCompletionRequest, CompletionRequest, ModelCapabilities, ModelCard, ModelList, random_id
from bento_llm.reasoning import PARSERS as REASONING_PARSERS
from bento_llm.runtime import LLMRuntime
from bento_llm.sampling import STRUCTURED_OUTPUTS, to_sampling_params
from bento_llm.structured import structured_outputs_param
from bento_llm.stream_events import chat_events, completion_events
from bento_llm.streaming import DONE, ChunkEvents, ClientDisconnected, EventStreamResponse, sse, unless_disconnected
from bento_llm.tool_calling import ToolSetup, force_tool_call, tool_setup

logger = logging.getLogger("bento_llm")


class OpenAIServing:
    def __init__(self, runtime: LLMRuntime) -> None:
        self.runtime = runtime

    # ------------------------------------------------------------------ shared

    def models(self) -> ModelList:
        rt = self.runtime
        capabilities = ModelCapabilities(
            tool_calling=rt.tool_parser is not None, tool_call_parser=rt.tool_parser, forced_tool_choice=STRUCTURED_OUTPUTS,
            structured_outputs=STRUCTURED_OUTPUTS, reasoning_parser=rt.reasoning_parser,
        )  # fmt: skip
        card = ModelCard(id=rt.model_name, root=rt.model_path or rt.settings.model, max_model_len=rt.max_model_len or None, capabilities=capabilities)
        return ModelList(data=[card])

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.runtime.model_name, self.runtime.settings.model):
            raise model_not_found(name)

    def check_length(self, prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        limit = self.runtime.max_model_len
        if prompt_tokens == 0:
            raise bad_request(f"The {param} is empty: it must contain at least one token", param=param)
        if prompt_tokens >= limit or (max_tokens is not None and prompt_tokens + max_tokens > limit):
            raise context_length_exceeded(limit, prompt_tokens, max_tokens, param)

    async def compile_grammar(self, request: CompletionRequest | ChatCompletionRequest, params: Any) -> None:
        """The request's grammar, compiled (or cached) before it starts: a grammar the library
        cannot compile is a 400 naming the field it came from."""
        if params.structured_outputs is None:
            return
        try:
            await self.runtime.require_engine().compile_grammar(params)
        except ValueError as e:
            raise from_value_error(e, {"structured_outputs": structured_outputs_param(request) or "tools"}) from None

    def start(self, request_ids: list[str], prompts: list[Prompt], params: Any, param: str, stream: bool) -> Job:
        """The engine requests; `stream`: whether their outputs go out as they come (else only
        the final ones are read: the engine then hands over just the first and the last)."""
        engine = self.runtime.require_engine()
        job = Job(self.runtime, request_ids)
        stream = stream and not buffered(params)  # a buffered stream sends only the final outputs too
        try:
            for request_id, prompt in zip(request_ids, prompts):
                timer = self.runtime.metrics.timer()
                job.streams.append(engine.add_request(request_id, prompt.token_ids, params, stream=stream))
                job.timers.append(timer)
        except ValueError as e:
            job.abort_unfinished()
            raise from_value_error(e, {"prompt": param}) from None
        except BaseException:
            job.abort_unfinished()
            raise
        return job

    async def respond(self, raw: Request, job: Job, build: Any) -> Response:
        """Non-streaming: wait for every request, aborting them if the client leaves."""
        try:
            finals = await unless_disconnected(raw, job.final_outputs(), job.abort_unfinished)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; for the access log only
        finally:
            await job.close()
        return JSONResponse(build(finals))

    def stream(self, job: Job, events: AsyncIterator[str]) -> Response:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except OpenAIError as e:
                yield sse(e.body())
            except Exception:  # noqa: BLE001 - one failed request must not take the server down
                logger.exception("stream failed")
                yield sse(OpenAIError("The server had an error while processing your request.", 500, "server_error").body())
            else:
                return
            finally:
                await job.close()
            yield DONE

        return EventStreamResponse(guarded())

    # ------------------------------------------------------------------ completions

    def completion_prompts(self, request: CompletionRequest) -> list[Prompt]:
        tokenizer, vocab = self.runtime.tokenizer, self.runtime.vocab_size
        raw = request.prompt
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise bad_request("prompt must not be empty", param="prompt")
        if isinstance(raw[0], int):
            raw = [raw]  # one prompt given as token ids
        prompts = []
        for item in raw:
            if isinstance(item, str):
                ids = tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
                prompts.append(Prompt(list(ids), item))
                continue
            if not item:
                raise bad_request("a token-id prompt must not be empty", param="prompt")
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="prompt")
            prompts.append(Prompt(list(item)))
        return prompts

    async def completions(self, request: CompletionRequest, raw: Request) -> Response:
        rt = self.runtime
        rt.require_engine()
        self.check_model(request.model)
        k = request.logprobs
        params = to_sampling_params(request, max_tokens=request.max_tokens, logprobs=k, vocab_size=rt.vocab_size)
        await self.compile_grammar(request, params)
        # Off the event loop: tokenizing megabytes takes seconds, and /livez must still answer.
        prompts = await asyncio.to_thread(self.completion_prompts, request)
        for prompt in prompts:
            self.check_length(len(prompt.token_ids), params.max_tokens, "prompt")
        response_id, created, n = random_id("cmpl"), int(time.time()), params.n
        # The text each prompt's choices start with: the prompt itself when echoed.
        echoes = [(p.text if p.text is not None else rt.tokenizer.decode(p.token_ids)) if request.echo else "" for p in prompts]
        ids = [response_id] if len(prompts) == 1 else [f"{response_id}-{i}" for i in range(len(prompts))]
        job = self.start(ids, prompts, params, "prompt", request.stream)

        def logprobs_of(out: Any, start: int, offset: int) -> dict[str, Any] | None:
            if k is None:
                return None
            return fmt.completion_logprobs(rt.token_text, out.token_ids_since(start), out.logprobs_since(start) or [], k, offset)

        if not request.stream:

            def build(finals: list[Any]) -> dict[str, Any]:
                choices = []
                for i, final in enumerate(finals):
                    prefix = echoes[i]
                    for out in final.outputs:
                        choices.append({
                            "index": i * n + out.index,
                            "text": prefix + out.text,
                            "logprobs": logprobs_of(out, 0, len(prefix)),
                            "finish_reason": out.finish_reason,
                            "stop_reason": out.stop_reason,
                            "prompt_logprobs": fmt.prompt_logprobs(rt.token_text, final.prompt_logprobs),
                        })  # fmt: skip
                choices.sort(key=lambda c: c["index"])
                completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
                return {
                    "id": response_id, "object": "text_completion", "created": created, "model": rt.model_name,
                    "choices": choices, "usage": fmt.usage(sum(len(p.token_ids) for p in prompts), completion),
                }  # fmt: skip

            return await self.respond(raw, job, build)

        chunks = ChunkEvents("text_completion", response_id, created, rt.model_name, request.include_usage)
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        return self.stream(job, completion_events(job, chunks, n, echoes, buffered(params), logprobs_of, prompt_tokens, request.include_usage))

    # ------------------------------------------------------------------ chat

    def chat_prompt(self, request: ChatCompletionRequest, tools: ToolSetup | None = None) -> Prompt:
        text = apply_chat_template(self.runtime.tokenizer, request, tools.template_tools if tools else None)
        return Prompt(list(self.runtime.tokenizer.encode(text, add_special_tokens=False)), text)

    def output_parser(self, tools: ToolSetup, prompt: Prompt) -> OutputParser:
        reasoning = self.runtime.reasoning_parser
        return OutputParser(REASONING_PARSERS[reasoning].for_prompt(prompt.text or "") if reasoning else None, tools.parser)

    async def chat(self, request: ChatCompletionRequest, raw: Request) -> Response:
        rt = self.runtime
        rt.require_engine()
        self.check_model(request.model)
        k = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.requested_max_tokens
        params = to_sampling_params(request, max_tokens=max_tokens, logprobs=k, vocab_size=rt.vocab_size)
        tools = tool_setup(request, rt.tool_parser)
        params = force_tool_call(params, tools)
        await self.compile_grammar(request, params)
        prompt = await asyncio.to_thread(self.chat_prompt, request, tools)  # off the loop, as completions
        parser = self.output_parser(tools, prompt)
        self.check_length(len(prompt.token_ids), params.max_tokens, "messages")
        # vLLM's echo: repeat the final message when the reply continues it.
        last = request.messages[-1]
        echo = last.text(len(request.messages) - 1) if request.echo and last.role == "assistant" else ""
        response_id, created, n = random_id("chatcmpl"), int(time.time()), params.n
        job = self.start([response_id], [prompt], params, "messages", request.stream)

        def logprobs_of(out: Any, start: int) -> dict[str, Any] | None:
            if k is None:
                return None
            # "refusal" is required by OpenAI's schema; this server never refuses.
            return {"content": fmt.chat_logprobs(rt.token_text, out.token_ids_since(start), out.logprobs_since(start) or [], k), "refusal": None}

        if not request.stream:

            def choice(out: Any) -> dict[str, Any]:
                message = parser.parse(echo + out.text, finished=True)
                return {
                    "index": out.index,
                    "message": message_body(message, parser),
                    "logprobs": logprobs_of(out, 0),
                    "finish_reason": finish_reason(out.finish_reason, bool(message.calls)),
                    "stop_reason": out.stop_reason,
                }

            def build(finals: list[Any]) -> dict[str, Any]:
                final = finals[0]
                choices = [choice(out) for out in sorted(final.outputs, key=lambda o: o.index)]
                completion = sum(len(o.token_ids) for o in final.outputs)
                return {
                    "id": response_id, "object": "chat.completion", "created": created, "model": rt.model_name,
                    "choices": choices, "usage": fmt.usage(len(prompt.token_ids), completion),
                }  # fmt: skip

            return await self.respond(raw, job, build)

        chunks = ChunkEvents("chat.completion.chunk", response_id, created, rt.model_name, request.include_usage)
        return self.stream(job, chat_events(job, chunks, n, parser, echo, buffered(params), logprobs_of, len(prompt.token_ids), request.include_usage))
