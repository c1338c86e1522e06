"""A request's output constraint -> the engine's StructuredOutputsParams.

Five spellings reach the same engine field: OpenAI's `response_format` (chat), vLLM's older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, and vLLM's newer
`structured_outputs` object. A request sets at most one; every 400 names the field it sent.
"""

from __future__ import annotations

from typing import Any

from engine.structured_outputs import StructuredOutputsParams

from bento_llm.errors import bad_request
from bento_llm.protocol import ChatCompletionRequest, CompletionRequest

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_FIELDS = ("json", "regex", "choice", "grammar", "json_object")
_JSON_SCHEMA_FIELDS = {"name", "schema", "strict", "description"}


def _sources(request: CompletionRequest | ChatCompletionRequest) -> list[str]:
    names = [name for name in (*_GUIDED, "structured_outputs") if getattr(request, name) is not None]
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.get("type") != "text":
        names.insert(0, "response_format")
    return names


def structured_outputs_param(request: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The request field its constraint came from (None: unconstrained)."""
    sources = _sources(request)
    return sources[0] if sources else None


def structured_outputs_of(request: CompletionRequest | ChatCompletionRequest) -> StructuredOutputsParams | None:
    sources = _sources(request)
    if not sources:
        return None
    if len(sources) > 1:
        raise bad_request(f"Set only one output constraint; got {', '.join(sources)}", param=sources[1])
    param = sources[0]
    if param == "response_format":
        fields, param = _response_format(request.response_format)
    elif param == "structured_outputs":
        fields = dict(request.structured_outputs)
        unknown = sorted(set(fields) - set(_STRUCTURED_FIELDS))
        if unknown:
            raise bad_request(
                f"Unrecognized structured_outputs field: {unknown[0]} (supported: {', '.join(_STRUCTURED_FIELDS)})",
                param=f"structured_outputs.{unknown[0]}", code="unknown_parameter",
            )
    else:
        fields = {_GUIDED[param]: getattr(request, param)}
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as e:
        message = str(e).replace("SamplingParams.structured_outputs", param, 1)
        code = "unsupported_parameter" if "not supported" in message else "invalid_value"
        raise bad_request(message, param=param, code=code) from None


def _response_format(value: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """OpenAI's response_format: {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}."""
    kind = value.get("type")
    if kind == "json_object":
        extra = sorted(set(value) - {"type"})
        if extra:
            raise bad_request(f"Unrecognized response_format field: {extra[0]}", param=f"response_format.{extra[0]}")
        return {"json_object": True}, "response_format"
    if kind != "json_schema":
        raise bad_request(
            f"Invalid value for 'response_format.type': {kind!r}; supported: 'text', 'json_object', 'json_schema'",
            param="response_format.type", code="invalid_value",
        )
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise bad_request(f"Unrecognized response_format field: {extra[0]}", param=f"response_format.{extra[0]}")
    spec = value.get("json_schema")
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise bad_request("Missing required parameter: 'response_format.json_schema'.", param=param, code="missing_required_parameter")
    unknown = sorted(set(spec) - _JSON_SCHEMA_FIELDS)
    if unknown:
        raise bad_request(f"Unrecognized response_format.json_schema field: {unknown[0]}", param=f"{param}.{unknown[0]}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise bad_request("response_format.json_schema.name must be a non-empty string", param=f"{param}.name")
    if spec.get("strict") not in (None, True, False):
        raise bad_request("response_format.json_schema.strict must be a boolean", param=f"{param}.strict")
    schema = spec.get("schema")
    if schema is None:  # OpenAI's schema is optional: then any JSON object
        return {"json_object": True}, param
    if not isinstance(schema, dict):
        raise bad_request("response_format.json_schema.schema must be a JSON object", param=f"{param}.schema")
    return {"json": schema}, f"{param}.schema"
