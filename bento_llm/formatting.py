"""Engine outputs -> OpenAI's logprobs shapes and stream chunks.

Chunks are plain dicts: they are built once per token per request, and OpenAI's exact
shape ("delta": {} at the end, "usage" present only when asked for) is easier to say
directly than through pydantic's exclude rules."""

from __future__ import annotations

from typing import Any, Callable, Sequence

# OpenAI reports a token the model found impossible as -9999.0 rather than -inf, which
# JSON cannot carry.
MIN_LOGPROB = -9999.0

TokenText = Callable[[int], str]


def _clamp(value: float | None) -> float:
    if value is None or value != value:  # None or NaN
        return MIN_LOGPROB
    return max(float(value), MIN_LOGPROB)


def _top(position: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(position.items(), key=lambda kv: kv[1], reverse=True)[:k]


def completion_logprobs(
    token_text: TokenText,
    token_ids: Sequence[int],
    positions: Sequence[dict[int, float]] | None,
    k: int,
    offset: int,
) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, top_logprobs as {token: logprob}."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, position in zip(token_ids, positions or []):
        text = token_text(token_id)
        tokens.append(text)
        token_logprobs.append(_clamp(position.get(token_id)))
        top = {token_text(t): _clamp(lp) for t, lp in _top(position, k)}
        # vLLM's habit, kept: the sampled token is always among the top ones.
        top.setdefault(text, _clamp(position.get(token_id)))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(
    token_text: TokenText, positions: Sequence[dict[int, float] | None] | None
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's prompt_logprobs shape: per prompt token, {token id: {logprob, rank, decoded_token}}
    with rank counted among the reported tokens (None for the first prompt token)."""
    if positions is None:
        return None
    result: list[dict[str, dict[str, Any]] | None] = []
    for position in positions:
        if position is None:
            result.append(None)
            continue
        ranked = sorted(position.items(), key=lambda kv: kv[1], reverse=True)
        result.append({
            str(tid): {"logprob": _clamp(lp), "rank": rank, "decoded_token": token_text(tid)}
            for rank, (tid, lp) in enumerate(ranked, start=1)
        })  # fmt: skip
    return result


def chat_logprobs(
    token_text: TokenText,
    token_ids: Sequence[int],
    positions: Sequence[dict[int, float]] | None,
    k: int,
) -> list[dict[str, Any]]:
    """The chat shape: one entry per token with its bytes and its top alternatives."""
    content = []
    for token_id, position in zip(token_ids, positions or []):
        text = token_text(token_id)
        content.append(
            {
                "token": text,
                "logprob": _clamp(position.get(token_id)),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {"token": (t := token_text(tid)), "logprob": _clamp(lp), "bytes": list(t.encode("utf-8"))}
                    for tid, lp in _top(position, k)
                ],
            }
        )
    return content


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(
    object_name: str, response_id: str, created: int, model: str, choices: list[dict[str, Any]],
    include_usage: bool, usage_value: dict[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    body: dict[str, Any] = {
        "id": response_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage and (usage_value is not None or object_name == "chat.completion.chunk"):
        # Chat: null on every chunk but the last, as OpenAI does (its chat chunk schema allows
        # null). The legacy completions schema does not, so its chunks carry usage only at the end.
        body["usage"] = usage_value
    return body
