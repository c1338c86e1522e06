"""OpenAI-shaped errors: every failure a client sees is
{"error": {"message", "type", "param", "code"}} with the status OpenAI would use."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Mapping

from pydantic import ValidationError
from starlette.responses import JSONResponse

logger = logging.getLogger("bento_llm")


class OpenAIError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, 400, param=param, code=code)


def unsupported(param: str, what: str | None = None) -> OpenAIError:
    return OpenAIError(f"{what or param} is not supported yet", 400, param=param, code="unsupported_parameter")


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        f"The model `{name}` does not exist.", 404, param="model", code="model_not_found"
    )


def server_error(message: str = "The server had an error while processing your request.") -> OpenAIError:
    return OpenAIError(message, 500, type="server_error")


def not_ready(message: str) -> OpenAIError:
    return OpenAIError(message, 503, type="server_error", code="model_not_ready")


def context_length_exceeded(
    max_model_len: int, prompt_tokens: int, max_tokens: int | None, param: str
) -> OpenAIError:
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{param} resulted in {prompt_tokens} tokens, leaving no room for a completion. "
            f"Please reduce the length of the {param}."
        )
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, "
            f"{max_tokens} in the completion). Please reduce the length of the {param} or completion."
        )
    return OpenAIError(message, 400, param=param, code="context_length_exceeded")


# Pydantic adds the member type of a union to an error location ("prompt", "list[int]", 0);
# those are not request fields and must not reach "param".
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _param_path(loc: Iterable[Any]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and "[" not in item and item not in _UNION_TAGS:
            parts.append(item)
    return ".".join(parts) or None


def from_validation_error(exc: ValidationError) -> OpenAIError:
    """The first problem pydantic found, named by the field it is in."""
    errors = exc.errors(include_url=False)
    if not errors:
        return bad_request(str(exc))
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request: "
            f"{first.get('ctx', {}).get('error', 'invalid JSON')}. The body must be a JSON object.",
            code="invalid_json",
        )
    param = _param_path(first["loc"])
    if kind == "extra_forbidden":
        return bad_request(
            f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "model_type" and not param:
        return bad_request("The request body must be a JSON object.", code="invalid_type")
    # Union members each report; when every error is about one field say so once.
    same_field = [e for e in errors if _param_path(e["loc"]) == param]
    if len(same_field) > 1:
        given = type(first.get("input")).__name__
        return bad_request(f"Invalid type for '{param}': got {given}.", param=param, code="invalid_type")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return bad_request(f"Invalid value for '{param}': {first['msg']}.", param=param, code=code)


_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")


def from_value_error(exc: ValueError, field_names: Mapping[str, str] | None = None) -> OpenAIError:
    """An engine ValueError (bad sampling value, prompt too long, ...) as a 400; the
    SamplingParams field it names becomes `param`, renamed to the request's own name."""
    message = str(exc)
    match = _SAMPLING_FIELD.search(message)
    param = None
    if match:
        param = (field_names or {}).get(match.group(1), match.group(1))
        message = _SAMPLING_FIELD.sub(param, message, count=1)
    elif "prompt" in message.lower():
        param = (field_names or {}).get("prompt", "prompt")
    code = "invalid_value"
    if "context" in message.lower() or "max_model_len" in message:
        code = "context_length_exceeded"
    elif "not supported" in message:
        code = "unsupported_parameter"
    return bad_request(message, param=param, code=code)
