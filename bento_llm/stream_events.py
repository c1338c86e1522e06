"""A streamed request's outputs as OpenAI's server-sent events, completions and chat.

An output carries every token since the last one read (several when the stream lags the
engine), so each output becomes one write: its chunks joined, not one write per chunk. The
last output goes out with the usage chunk and [DONE]."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from bento_llm import formatting as fmt
from bento_llm.chat_output import MessageStream, OutputParser, finish_reason
from bento_llm.jobs import Job
from bento_llm.streaming import DONE, ChunkEvents

# (completion output, first token to report) -> the choice's logprobs, or None when not asked
ChatLogprobs = Callable[[Any, int], dict[str, Any] | None]
# (completion output, first token to report, text offset of that token) -> the choice's logprobs
CompletionLogprobs = Callable[[Any, int, int], dict[str, Any] | None]


async def _joined(
    job: Job, buffered: bool, render: Callable[[int, Any], list[str]], usage: Callable[[], str | None], first: str | None = None
) -> AsyncIterator[str]:
    """One write per output: `render(prompt index, output)`'s events joined; the last output's
    go out with `usage()` (None: not asked for) and [DONE]. `first` goes out before any output."""
    if first is not None:
        yield first
    last: list[str] = []
    async for i, output in job.outputs():
        if buffered and not output.finished:
            continue
        parts = render(i, output)
        if len(job.finished) == len(job.streams):
            last = parts
        elif parts:
            yield "".join(parts)
    final = usage()
    yield "".join([*last, *([final] if final is not None else []), DONE])


def completion_events(
    job: Job, chunks: ChunkEvents, n: int, echoes: list[str], buffered: bool, logprobs_of: CompletionLogprobs,
    prompt_tokens: int, include_usage: bool,
) -> AsyncIterator[str]:
    """Choice i * n + j is sample j of prompt i; `echoes[i]` goes before its first text."""
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    offsets: dict[int, int] = {}
    done: set[int] = set()
    completion_tokens = 0

    def render(i: int, output: Any) -> list[str]:
        nonlocal completion_tokens
        parts: list[str] = []
        for out in output.outputs:
            index = i * n + out.index
            if index not in sent_text:
                sent_text[index] = sent_tokens[index] = offsets[index] = 0
                prefix = echoes[i]
            else:
                prefix = ""
            if index in done:
                continue
            delta = prefix + out.text[sent_text[index] :]
            start = sent_tokens[index]
            if not delta and out.num_token_ids == start and out.finish_reason is None:
                continue
            if out.finish_reason is not None:
                done.add(index)
            lp = logprobs_of(out, start, offsets[index])
            offsets[index] += len(delta)
            completion_tokens += out.num_token_ids - start
            sent_text[index], sent_tokens[index] = len(out.text), out.num_token_ids
            parts.append(chunks.event([{"index": index, "text": delta, "logprobs": lp,
                                        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]))  # fmt: skip
        return parts

    def usage() -> str | None:
        return chunks.usage(fmt.usage(prompt_tokens, completion_tokens)) if include_usage else None

    return _joined(job, buffered, render, usage)


def chat_events(
    job: Job, chunks: ChunkEvents, n: int, parser: OutputParser, echo: str, buffered: bool, logprobs_of: ChatLogprobs,
    prompt_tokens: int, include_usage: bool,
) -> AsyncIterator[str]:
    """One choice per chunk; `echo` (the assistant message the reply continues) prefixes the text."""
    # The role comes first, before any token, as OpenAI sends it.
    role = "".join([chunks.event([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]) for j in range(n)])  # fmt: skip
    messages = [MessageStream(parser) for _ in range(n)]
    sent_tokens = [0] * n
    done = [False] * n
    completion_tokens = 0

    def render(_: int, output: Any) -> list[str]:
        nonlocal completion_tokens
        parts: list[str] = []
        for out in output.outputs:
            j = out.index
            if done[j]:
                continue
            delta = messages[j].delta(echo + out.text, finished=out.finish_reason is not None)
            start = sent_tokens[j]
            if delta or out.num_token_ids > start:
                completion_tokens += out.num_token_ids - start
                sent_tokens[j] = out.num_token_ids
                lp = logprobs_of(out, start)
                if lp is None and (not delta or list(delta) == ["content"]):  # the common chunk, from a template
                    parts.append(chunks.content(j, delta.get("content", "")))
                else:
                    parts.append(chunks.event([{"index": j, "delta": delta or {"content": ""}, "logprobs": lp, "finish_reason": None}]))
            if out.finish_reason is not None:
                done[j] = True
                reason = finish_reason(out.finish_reason, messages[j].called)
                parts.append(chunks.event([{"index": j, "delta": {}, "logprobs": None,
                                            "finish_reason": reason, "stop_reason": out.stop_reason}]))  # fmt: skip
        return parts

    def usage() -> str | None:
        return chunks.usage(fmt.usage(prompt_tokens, completion_tokens)) if include_usage else None

    return _joined(job, buffered, render, usage, first=role)
