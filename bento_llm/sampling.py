"""Request fields -> engine SamplingParams, with engine complaints turned into 400s that
name the request's own field."""

from __future__ import annotations

import dataclasses

from engine import SamplingParams

from bento_llm.errors import bad_request, from_value_error
from bento_llm.protocol import ChatCompletionRequest, CompletionRequest
from bento_llm.structured import structured_outputs_of, structured_outputs_param

# Whether the engine can force output to a JSON schema (grammar-constrained decoding, issue 14's
# structured outputs, SamplingParams.structured_outputs). tool_choice "required"/named and
# /v1/models' capabilities read this.
STRUCTURED_OUTPUTS = "structured_outputs" in {f.name for f in dataclasses.fields(SamplingParams)}


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
        bias[token_id] = value
    return bias


def to_sampling_params(
    request: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
) -> SamplingParams:
    request.check_unsupported()
    structured_outputs = structured_outputs_of(request)
    if request.stop_token_ids:
        bad = [t for t in request.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"stop_token_ids {bad} are outside the vocabulary", param="stop_token_ids")
    # The request's names for SamplingParams fields, so that a 400 points at what was sent.
    names = {"logprobs": "logprobs", "max_tokens": "max_tokens", "prompt": "prompt"}
    if request.best_of is None:
        names["best_of"] = "n"  # the engine's best_of defaults to n
    if isinstance(request, ChatCompletionRequest):
        names.update(logprobs="top_logprobs", max_tokens=request.max_tokens_param, prompt="messages")
    if structured_outputs is not None:
        names["structured_outputs"] = structured_outputs_param(request)
    try:
        return SamplingParams(
            n=request.n if request.n is not None else 1,
            best_of=request.best_of,
            use_beam_search=request.use_beam_search,
            length_penalty=request.length_penalty,
            early_stopping=request.early_stopping,
            temperature=_or(request.temperature, 1.0),
            top_p=_or(request.top_p, 1.0),
            top_k=_or(request.top_k, -1),
            min_p=_or(request.min_p, 0.0),
            seed=request.seed,
            presence_penalty=_or(request.presence_penalty, 0.0),
            frequency_penalty=_or(request.frequency_penalty, 0.0),
            repetition_penalty=_or(request.repetition_penalty, 1.0),
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            include_stop_str_in_output=request.include_stop_str_in_output,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=request.prompt_logprobs,
            logit_bias=_logit_bias(request.logit_bias, vocab_size),
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            structured_outputs=structured_outputs,
        )
    except ValueError as e:
        raise from_value_error(e, names) from None


def _or(value, default):
    return default if value is None else value


__all__ = ["to_sampling_params"]
