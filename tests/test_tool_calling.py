"""Tool calling and reasoning through the /v1 app over a real tiny engine whose tokenizer
carries a Hermes-style chat template with Qwen3-style thinking (tests/chat_templates.py).

What is end to end here and what is not: a tiny random model never writes a tool call by itself,
and this branch has no grammar engine to force one. So the model's turn is pre-filled: the last
assistant message holds the call text, `continue_final_message` + `echo` make it part of the
reply, and a logit_bias on the end-of-turn token makes the engine stop at once (a real "stop").
Everything after that is the server's real path: prompt through the template with `tools=`,
the engine, parsing, ids, finish_reason, streaming deltas, and the openai SDK's agent loop."""

from __future__ import annotations

import json

import openai
import pytest
from jsonschema import Draft202012Validator

from bento_llm.sampling import STRUCTURED_OUTPUTS
from tests.app_fixtures import app_client, assert_no_request_left, loaded_runtime
from tests.chat_templates import HERMES_THINKING, write_chat_template
from tests.helpers import make_tiny_llama
from tests.test_openai_app import events
from tests.test_openai_conformance import conforms

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
TOOLS = [WEATHER_TOOL, SEARCH_TOOL]
USER = {"role": "user", "content": "What is the weather in Paris?"}
CALLS = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "search", "arguments": {"q": "Paris events"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    with loaded_runtime(write_chat_template(make_tiny_llama(tmp_path_factory.mktemp("tools")), HERMES_THINKING)) as rt:
        yield rt


@pytest.fixture(scope="module")
def client(runtime):
    with app_client(runtime) as c:
        yield c


@pytest.fixture(autouse=True)
def no_request_left(runtime):
    yield
    assert_no_request_left(runtime)


def prefilled(runtime, reply: str, **extra) -> dict:
    """A request whose assistant turn is `reply`, ended at once by the engine (see the module doc)."""
    return {
        "messages": [USER, {"role": "assistant", "content": reply}], "tools": TOOLS,
        "continue_final_message": True, "add_generation_prompt": False, "echo": True,
        "logit_bias": {str(runtime.tokenizer.eos_token_id): 100}, "max_tokens": 4, "temperature": 0, **extra,
    }  # fmt: skip


def reassembled(chunks: list[dict]) -> dict:
    message = {"content": "", "reasoning_content": "", "tool_calls": []}
    reasons = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            message["content"] += delta.get("content") or ""
            message["reasoning_content"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls", []):
                if call["index"] == len(message["tool_calls"]):
                    message["tool_calls"].append({"id": call["id"], "type": call["type"], "function": {"name": call["function"]["name"], "arguments": ""}})
                message["tool_calls"][call["index"]]["function"]["arguments"] += call["function"].get("arguments", "")
            reasons.append(choice["finish_reason"])
    message["finish_reason"] = [r for r in reasons if r][-1]
    return message


def test_the_template_decides_the_parsers(runtime, client):
    assert (runtime.tool_parser, runtime.reasoning_parser) == ("hermes", "think")
    capabilities = client.get("/v1/models").json()["data"][0]["capabilities"]
    assert capabilities["tool_calling"] and capabilities["tool_call_parser"] == "hermes"
    assert capabilities["reasoning_parser"] == "think"


def test_tools_and_tool_history_reach_the_template(runtime, client):
    history = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    with_tools = client.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "max_tokens": 1}).json()
    without = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 1}).json()
    none = client.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "tool_choice": "none", "max_tokens": 1}).json()
    # The tool definitions are in the prompt unless tool_choice is "none".
    tool_tokens = len(runtime.tokenizer.encode(json.dumps(WEATHER_TOOL)))
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + tool_tokens
    assert none["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    # The earlier call and its result are rendered as the template writes them.
    from bento_llm.protocol import ChatCompletionRequest
    from bento_llm.serving import OpenAIServing
    from bento_llm.tool_calling import tool_setup

    request = ChatCompletionRequest.model_validate({"messages": history, "tools": TOOLS})
    prompt = OpenAIServing(runtime).chat_prompt(request, tool_setup(request, "hermes")).text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt
    assert '"name": "search"' in prompt


def test_tool_calls_in_the_response(runtime, client):
    body = conforms("chat", client.post("/v1/chat/completions", json=prefilled(runtime, CALLS)).json())
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check." and message["reasoning_content"] is None
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"q": "Paris events"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    only_first = client.post("/v1/chat/completions", json=prefilled(runtime, CALLS, parallel_tool_calls=False)).json()
    assert [c["function"]["name"] for c in only_first["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize(
    "reply",
    [CALLS, "No tools needed: it is sunny.", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>',
     '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>', "<think>\nThe user asks about weather.\n</think>\n\n" + CALLS],
    ids=["calls", "no_call", "malformed_arguments", "unknown_function", "reasoning_then_calls"],
)  # fmt: skip
def test_streamed_deltas_reassemble_to_the_response(runtime, client, reply):
    body = client.post("/v1/chat/completions", json=prefilled(runtime, reply)).json()
    chunks = [conforms("chat_chunk", c) for c in events(client.post("/v1/chat/completions", json=prefilled(runtime, reply, stream=True)))]
    streamed = reassembled(chunks)
    message = body["choices"][0]["message"]
    assert streamed["finish_reason"] == body["choices"][0]["finish_reason"]
    assert streamed["content"] == (message["content"] or "")
    assert streamed["reasoning_content"] == (message["reasoning_content"] or "")
    strip_ids = lambda calls: [{k: v for k, v in c.items() if k != "id"} for c in calls]  # noqa: E731 - ids are random
    assert strip_ids(streamed["tool_calls"]) == strip_ids(message.get("tool_calls", []))
    # Each call's id and name come once, in its first delta; the arguments come in pieces.
    headers = [c for chunk in chunks for ch in chunk["choices"] for c in ch["delta"].get("tool_calls", []) if "id" in c]
    assert len(headers) == len(streamed["tool_calls"])


def test_reasoning_content(runtime, client):
    body = client.post("/v1/chat/completions", json=prefilled(runtime, "<think>\nSunny, probably.\n</think>\n\nIt is sunny.")).json()
    message = conforms("chat", body)["choices"][0]["message"]
    assert message["reasoning_content"] == "Sunny, probably." and message["content"] == "It is sunny."
    assert body["choices"][0]["finish_reason"] == "stop"
    # A prompt that opens the block itself (DeepSeek-R1 distills): the reply starts inside it.
    kwargs = {"chat_template_kwargs": {"think_in_prompt": True}}
    r1 = client.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 6, "temperature": 0, "ignore_eos": True, **kwargs}).json()
    r1_message = r1["choices"][0]["message"]
    assert r1_message["content"] == "" and r1_message["reasoning_content"]  # never closed: all reasoning
    # enable_thinking=false (Qwen3): an empty block in the prompt, the reply is all answer.
    plain = client.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                                      "chat_template_kwargs": {"enable_thinking": False}}).json()  # fmt: skip
    assert plain["choices"][0]["message"]["reasoning_content"] is None and plain["choices"][0]["message"]["content"]


def test_openai_sdk_agent_loop(runtime, client):
    """The SDK's own types and stream accumulator over this server: the model's call (pre-filled,
    see the module doc), the client runs the tool and answers with a tool message, the model answers."""
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    forced = prefilled(runtime, CALLS.split("\n<tool_call>\n{\"name\": \"search\"")[0].replace("Let me check.\n", ""))
    messages, extra = forced.pop("messages"), {k: forced.pop(k) for k in list(forced) if k not in ("tools", "max_tokens", "temperature")}
    first = sdk.chat.completions.create(model=runtime.model_name, messages=messages, extra_body=extra, **forced)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    with sdk.chat.completions.stream(model=runtime.model_name, messages=messages, extra_body=extra, **forced) as stream:
        final = stream.get_final_completion()
    streamed_call = final.choices[0].message.tool_calls[0]
    assert (streamed_call.function.name, streamed_call.function.arguments) == (call.function.name, call.function.arguments)

    result = {"city": "Paris", "temperature_c": 18}  # the client runs its tool
    history = [USER, first.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    second = sdk.chat.completions.create(model=runtime.model_name, messages=history, tools=TOOLS, max_tokens=5, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.role == "assistant"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tool_choice": "auto"}, "tool_choice"),  # without tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        *([] if STRUCTURED_OUTPUTS else [  # forcing a call needs structured outputs
            ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
            ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}}, "tool_choice"),
        ]),  # fmt: skip
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.[0].function.name"),
        ({"tools": [SEARCH_TOOL, SEARCH_TOOL]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
         "messages.[1].tool_calls.[0].function.arguments"),  # fmt: skip
        ({"messages": [USER, {"role": "user", "content": "x", "tool_calls": []}]}, "messages.[1].tool_calls"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.[0].tool_call_id"),
    ],
)
def test_bad_tool_requests_name_the_field(client, extra, param):
    response = client.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 1, **extra})
    assert response.status_code == 400, response.text
    assert conforms("error", response.json())["error"]["param"] == param


# Tools whose arguments a grammar keeps short (enums, booleans): a tiny random model at
# temperature 1 would otherwise write strings until max_tokens.
FORCED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "is_open", "parameters": {
        "type": "object", "properties": {"open": {"type": "boolean"}}, "required": ["open"], "additionalProperties": False}}},
]  # fmt: skip
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in FORCED_TOOLS}
forced = pytest.mark.skipif(not STRUCTURED_OUTPUTS, reason="forcing a call needs structured outputs (SamplingParams.structured_outputs)")


@forced
@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "is_open"}}]
)
def test_forced_tool_choice_always_calls_validly(runtime, client, tool_choice):
    """tool_choice "required" or a named function: the model's own sampled output (no pre-fill),
    forced by structured outputs to a valid call, at temperature 1 over several seeds."""
    for seed in range(3):
        body = {"messages": [USER], "tools": FORCED_TOOLS, "tool_choice": tool_choice, "parallel_tool_calls": False,
                "temperature": 1.0, "seed": seed, "max_tokens": 64}  # fmt: skip
        choice = conforms("chat", client.post("/v1/chat/completions", json=body).json())["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        name = call["function"]["name"]
        if isinstance(tool_choice, dict):
            assert name == tool_choice["function"]["name"]
        Draft202012Validator(PARAMETERS[name]).validate(json.loads(call["function"]["arguments"]))
        streamed = reassembled(events(client.post("/v1/chat/completions", json={**body, "stream": True})))
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed["tool_calls"]] == [(name, call["function"]["arguments"])]


@forced
def test_openai_sdk_agent_loop_with_required_tool_choice(runtime, client):
    """The agent loop of the issue: the model must call a tool, the client runs it and answers
    with a tool message, the model answers."""
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    first = sdk.chat.completions.create(model=runtime.model_name, messages=[USER], tools=FORCED_TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, temperature=1.0, seed=7, max_tokens=64)  # fmt: skip
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content is None
    call = message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    Draft202012Validator(PARAMETERS[call.function.name]).validate(arguments)
    result = {"tool": call.function.name, "arguments": arguments, "answer": 42}
    history = [USER, message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    second = sdk.chat.completions.create(model=runtime.model_name, messages=history, tools=FORCED_TOOLS, max_tokens=5, temperature=0)
    assert second.choices[0].message.role == "assistant" and second.usage.prompt_tokens > first.usage.prompt_tokens
