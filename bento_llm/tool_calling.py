"""A chat request's tools -> what the chat template sees, which parser reads the output, and
(for tool_choice "required" or a named function) the JSON schema the output is forced to.

tool_choice "none" leaves the tools out of the prompt: a model that is shown tools may call
one, and "none" promises the client that it will not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bento_llm.errors import bad_request, from_value_error, unsupported
from bento_llm.protocol import ChatCompletionRequest, NamedToolChoice
from bento_llm.sampling import STRUCTURED_OUTPUTS
from bento_llm.tool_parsers import PARSERS, NamedToolParser, RequiredToolParser, ToolParser


@dataclass
class ToolSetup:
    template_tools: list[dict[str, Any]] | None = None  # the `tools=` of apply_chat_template
    parser: ToolParser | None = None
    schema: dict[str, Any] | None = None  # what structured outputs must force, if anything


def _parameters(function: Any) -> dict[str, Any]:
    return function.parameters if function.parameters is not None else {"type": "object", "properties": {}}


def tool_call_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema the whole output must match when tool_choice forces a call: a named
    function's arguments, or for "required" an array of {"name", "parameters"} objects (one
    when parallel_tool_calls is false), each naming one of the tools. None otherwise."""
    choice, tools = request.tool_choice, request.tools or []
    if isinstance(choice, NamedToolChoice):
        return next(_parameters(t.function) for t in tools if t.function.name == choice.function.name)
    if choice != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t.function)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def tool_setup(request: ChatCompletionRequest, parser_name: str | None) -> ToolSetup:
    choice, tools = request.tool_choice, request.tools
    if not tools or choice == "none":
        return ToolSetup()
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    names = [t.function.name for t in tools]
    parallel = request.parallel_tool_calls is not False
    if choice in (None, "auto"):
        if parser_name is None:
            raise bad_request(
                "This model's chat template has no tool-call format this server can read; start the "
                "server with tool_call_parser set to hermes, llama3_json or mistral if the model was "
                "tuned for one of them.",
                param="tools",
            )
        return ToolSetup(template_tools, PARSERS[parser_name](names, parallel))
    if not STRUCTURED_OUTPUTS:
        raise unsupported("tool_choice", "tool_choice 'required' or a named function (forcing a call needs structured outputs)")
    parser = NamedToolParser(choice.function.name) if isinstance(choice, NamedToolChoice) else RequiredToolParser(names, parallel)
    return ToolSetup(template_tools, parser, tool_call_schema(request))


def force_tool_call(params: Any, setup: ToolSetup) -> Any:
    """SamplingParams whose output structured outputs force to the call(s) tool_choice asks for."""
    if setup.schema is None:
        return params
    if getattr(params, "structured_outputs", None) is not None:
        raise bad_request("tool_choice 'required' or a named function cannot be combined with another output constraint", param="tool_choice")
    try:
        return dataclasses.replace(params, structured_outputs={"json": setup.schema})
    except ValueError as e:  # a keyword in a tool's parameters the grammar cannot enforce
        raise from_value_error(e, {"structured_outputs": "tools"}) from None
