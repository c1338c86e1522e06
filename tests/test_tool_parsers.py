"""Tool-call and reasoning parsers on recorded model outputs (with and without calls, several
calls, malformed JSON, unknown functions, outputs cut short), and the streaming rule they are
built for: whatever the chunking, the deltas reassemble to exactly the non-streamed message."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bento_llm.chat_output import MessageStream, OutputParser, finish_reason, message_body
from bento_llm.reasoning import ThinkReasoningParser, detect_reasoning_parser
from bento_llm.tool_parsers import (
    HermesToolParser,
    Llama3JSONToolParser,
    MistralToolParser,
    NamedToolParser,
    RequiredToolParser,
    detect_tool_parser,
)

TOOLS = ["get_weather", "search"]
WEATHER = '{"city": "Paris", "unit": "celsius"}'

# Outputs of the formats' own models (Qwen2.5 for Hermes, Llama 3.1 for llama3_json, Mistral
# 7B v0.3), as their tokenizers decode them; (text, expected content, expected calls).
HERMES = [
    ("The weather in Paris is mild today.", "The weather in Paris is mild today.", []),
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', "", [("get_weather", WEATHER)]),
    (
        f'Let me look that up.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"query": "a<b </tool", "n": 3}}\n</tool_call>',
        "Let me look that up.",
        [("get_weather", WEATHER), ("search", '{"query": "a<b </tool", "n": 3}')],
    ),
    # Arguments written before the name, no arguments at all, a missing final brace.
    ('<tool_call>{"arguments": {"q": 1}, "name": "search"}</tool_call>', "", [("search", '{"q": 1}')]),
    ('<tool_call>{"name": "search"}</tool_call>', "", [("search", "{}")]),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "x"}\n</tool_call>', "", [("search", '{"q": "x"}')]),
    # Malformed JSON in the arguments: a call all the same, its arguments as written (OpenAI's
    # documented behaviour: arguments may be invalid JSON, the client checks).
    ('<tool_call>\n{"name": "search", "arguments": {"q": }}\n</tool_call>', "", [("search", '{"q": }}')]),
    # Not a call: no JSON, an unknown function, no name. The block stays text.
    ("<tool_call>\nsearch(q=1)\n</tool_call>", "<tool_call>\nsearch(q=1)\n</tool_call>", []),
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', []),
    ('Hmm <tool_call>{"arguments": {}}</tool_call> ok', 'Hmm <tool_call>{"arguments": {}}</tool_call> ok', []),
    # Cut short by max_tokens inside the call: the call as far as it was written.
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "", [("get_weather", '{"city": "Par')]),
    ("Almost <tool_", "Almost <tool_", []),
    ('I will call.\n<tool_call>\n{"na', "I will call.\n<tool_call>\n{\"na", []),
]
LLAMA = [
    ("It is sunny.", "It is sunny.", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [("get_weather", WEATHER)]),
    ('<|python_tag|>{"name": "get_weather", "parameters": ' + WEATHER + "}", "", [("get_weather", WEATHER)]),
    ('{"name": "search", "parameters": {"q": "a"}}; {"name": "search", "parameters": {"q": "b"}}', "",
     [("search", '{"q": "a"}'), ("search", '{"q": "b"}')]),  # fmt: skip
    ('{"answer": 42}', '{"answer": 42}', []),  # a JSON answer, not a call
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ('{"name": "search", "parameters": {"q": "a"}} That is all.', "That is all.", [("search", '{"q": "a"}')]),
]
MISTRAL = [
    ("Sunny.", "Sunny.", []),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": ' + WEATHER + "}]", "", [("get_weather", WEATHER)]),
    ('[{"name": "search", "arguments": {"q": 1}}, {"name": "get_weather", "arguments": {}}]', "",
     [("search", '{"q": 1}'), ("get_weather", "{}")]),  # fmt: skip
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ('[TOOL_CALLS][{"name": "search", "arguments": {"q": 1}}] Done.', "Done.", [("search", '{"q": 1}')]),
]
CASES = [(HermesToolParser, *c) for c in HERMES] + [(Llama3JSONToolParser, *c) for c in LLAMA] + [(MistralToolParser, *c) for c in MISTRAL]


def reassemble(parser: OutputParser, pieces: list[str]) -> dict:
    """Stream `pieces` (each a new piece of output) through a MessageStream and put the deltas
    back together as a client does."""
    stream = MessageStream(parser)
    text, message = "", {"content": "", "reasoning_content": "", "tool_calls": []}
    for k, piece in enumerate(pieces):
        text += piece
        delta = stream.delta(text, finished=k == len(pieces) - 1)
        for key in ("content", "reasoning_content"):
            message[key] += delta.get(key, "")
        for call in delta.get("tool_calls", []):
            calls = message["tool_calls"]
            if call["index"] == len(calls):
                assert call["id"].startswith("call_") and call["type"] == "function" and call["function"]["name"]
                calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}  # name once
            calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return message


def assert_stream_matches(parser: OutputParser, text: str, pieces: list[str], caplog) -> None:
    assert "".join(pieces) == text
    whole = parser.parse(text, finished=True)
    with caplog.at_level(logging.WARNING, logger="bento_llm"):
        streamed = reassemble(parser, pieces)
    assert not caplog.records, "a parse of a longer text changed what was already sent"
    assert streamed["content"] == whole.content
    assert streamed["reasoning_content"] == (whole.reasoning or "")
    assert [(c["name"], c["arguments"]) for c in streamed["tool_calls"]] == [(c.name, c.arguments) for c in whole.calls]


@pytest.mark.parametrize("parser_class,text,content,calls", CASES)
def test_recorded_outputs(parser_class, text, content, calls, caplog):
    parser = OutputParser(tools=parser_class(TOOLS))
    message = parser.parse(text, finished=True)
    assert message.content == content
    assert [(c.name, c.arguments) for c in message.calls] == calls
    # Streamed one character at a time (every possible split of a tag) and in one piece.
    assert_stream_matches(parser, text, list(text), caplog)
    assert_stream_matches(parser, text, [text], caplog)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_any_chunking_reassembles_to_the_whole(case, cuts):
    parser_class, text, *_ = case
    edges = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = [text[a:b] for a, b in zip(edges, edges[1:])] or [""]
    whole = OutputParser(tools=parser_class(TOOLS)).parse(text, finished=True)
    streamed = reassemble(OutputParser(tools=parser_class(TOOLS)), pieces)
    assert streamed["content"] == whole.content
    assert [(c["name"], c["arguments"]) for c in streamed["tool_calls"]] == [(c.name, c.arguments) for c in whole.calls]


FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", "<think>", "</think>", "</thi", "[TOOL_CALLS]", "<|python_tag|>",
             "{", "}", "[", "]", ",", ";", ":", '"name"', '"arguments"', '"parameters"', '"search"', '"q"', '"a<b"',
             "1", "12", "true", " ", "\n", "x", "<", '"']  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30),
    parser_class=st.sampled_from([HermesToolParser, Llama3JSONToolParser, MistralToolParser]),
    reasoning=st.sampled_from([None, False, True]),
)
def test_streams_never_take_back_what_they_sent(parts, parser_class, reasoning):
    """On any text built from the formats' pieces (most of it malformed), every parse extends
    the previous one, so the stream adds up to the whole message."""
    think = None if reasoning is None else ThinkReasoningParser(starts_inside=reasoning)
    text = "".join(parts)
    whole = OutputParser(think, parser_class(TOOLS)).parse(text, finished=True)
    stream = MessageStream(OutputParser(think, parser_class(TOOLS)))
    sent: dict = {}
    for end in range(len(text) + 1):
        stream.delta(text[:end], finished=end == len(text))
        now = (stream.sent["content"], stream.sent["reasoning_content"], list(stream.call_args))
        for before, after in zip(sent.get("last", ("", "", [])), now):
            if isinstance(before, list):
                assert all(after[i].startswith(b) for i, b in enumerate(before)), (text, end)
            else:
                assert after.startswith(before), (text, end)
        sent["last"] = now
    assert stream.sent["content"] == whole.content
    assert stream.sent["reasoning_content"] == (whole.reasoning or "")
    assert stream.call_args == [c.arguments for c in whole.calls]


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '<tool_call>{"name": "search", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert [c.name for c in HermesToolParser(TOOLS, parallel=False).parse(text, True).calls] == ["search"]


def test_forced_tool_choice_parsers():
    """What structured outputs force for tool_choice: a named function's arguments, or for
    "required" an array of {"name", "parameters"} objects."""
    named = NamedToolParser("get_weather").parse(" " + WEATHER + "\n", True)
    assert named.content == "" and [(c.name, c.arguments) for c in named.calls] == [("get_weather", WEATHER)]
    required = RequiredToolParser(TOOLS).parse('[{"name": "search", "parameters": {"q": 1}}, {"name": "get_weather", "parameters": {}}]', True)
    assert [(c.name, c.arguments) for c in required.calls] == [("search", '{"q": 1}'), ("get_weather", "{}")]


REASONING = [
    # (text, prompt opened <think>, reasoning, content)
    ("<think>\nThe user wants 2+2.\n</think>\n\nIt is 4.", False, "The user wants 2+2.", "It is 4."),
    ("It is 4.", False, "", "It is 4."),  # Qwen3 with enable_thinking=false
    ("The user wants 2+2.\n</think>\n\nIt is 4.", True, "The user wants 2+2.", "It is 4."),  # R1 distills
    ("<think>\nStill thinking when max_tokens ran ou", False, "Still thinking when max_tokens ran ou", ""),
    ("<thin", False, "", "<thin"),
]


@pytest.mark.parametrize("text,inside,reasoning,content", REASONING)
def test_reasoning(text, inside, reasoning, content, caplog):
    parser = OutputParser(reasoning=ThinkReasoningParser(inside))
    message = parser.parse(text, finished=True)
    assert (message.reasoning, message.content) == (reasoning, content)
    assert_stream_matches(parser, text, list(text), caplog)
    body = message_body(message, parser)
    assert body["reasoning_content"] == (reasoning or None) and body["content"] == content


def test_reasoning_then_tool_call(caplog):
    text = f'<think>\nI need the weather.\n</think>\n\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
    parser = OutputParser(ThinkReasoningParser(False), HermesToolParser(TOOLS))
    message = parser.parse(text, finished=True)
    assert message.reasoning == "I need the weather." and message.content == ""
    assert [(c.name, c.arguments) for c in message.calls] == [("get_weather", WEATHER)]
    body = message_body(message, parser)
    assert body["content"] is None and body["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": WEATHER}
    assert json.loads(body["tool_calls"][0]["function"]["arguments"]) == json.loads(WEATHER)
    assert finish_reason("stop", True) == "tool_calls" and finish_reason("length", True) == "length"
    assert_stream_matches(parser, text, list(text), caplog)


def test_without_parsers_the_text_is_untouched():
    text = "  <tool_call> <think> as generated \n"
    assert OutputParser().parse(text, finished=False).content == text
    assert reassemble(OutputParser(), list(text))["content"] == text


def test_detection_from_chat_templates():
    assert detect_tool_parser("{% if tools %}<tool_call>{{ tool | tojson }}</tool_call>{% endif %}") == "hermes"
    assert detect_tool_parser("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS] [TOOL_CALLS]") == "mistral"
    assert detect_tool_parser("Given the following functions, please respond with a JSON for a function call") == "llama3_json"
    assert detect_tool_parser("{{ '<|im_start|>' + message['role'] }}") is None
    assert detect_reasoning_parser("{{ '<think>\\n' }}") == "think" and detect_reasoning_parser("plain") is None


CITY_TOOL = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}
SEARCH_TOOL = {"name": "search"}  # no parameters: any object


def _request(tool_choice, parallel=None):
    from bento_llm.protocol import ChatCompletionRequest

    tools = [{"type": "function", "function": f} for f in (CITY_TOOL, SEARCH_TOOL)]
    body = {"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": tool_choice}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    return ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize(
    "tool_choice,parallel,valid,invalid",
    [
        ({"type": "function", "function": {"name": "get_weather"}}, None,
         ['{"city": "Paris"}'], ['{"town": "Paris"}', '{"city": 3}', "[]"]),
        ("required", None,
         ['[{"name": "get_weather", "parameters": {"city": "Paris"}}]',
          '[{"name": "search", "parameters": {"q": 1}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]'],
         ["[]", '[{"name": "launch", "parameters": {}}]', '[{"name": "get_weather", "parameters": {}}]', '{"name": "search", "parameters": {}}']),
        ("required", False, ['[{"name": "search", "parameters": {}}]'],
         ['[{"name": "search", "parameters": {}}, {"name": "search", "parameters": {}}]']),
    ],
    ids=["named", "required", "required_one"],
)  # fmt: skip
def test_tool_call_schema_is_what_the_forced_parsers_read(tool_choice, parallel, valid, invalid):
    """tool_choice "required" / a named function force the output to this schema (structured
    outputs); every output it allows reads back as calls whose arguments fit the tool."""
    from jsonschema import Draft202012Validator

    from bento_llm.tool_calling import tool_call_schema

    request = _request(tool_choice, parallel)
    validator = Draft202012Validator(tool_call_schema(request))
    for text in invalid:
        assert not validator.is_valid(json.loads(text)), text
    for text in valid:
        assert validator.is_valid(json.loads(text)), text
        if isinstance(tool_choice, dict):
            parser = NamedToolParser(tool_choice["function"]["name"])
        else:
            parser = RequiredToolParser(["get_weather", "search"], parallel is not False)
        calls = parser.parse(text, finished=True).calls
        expected = [json.loads(text)] if isinstance(tool_choice, dict) else [c["parameters"] for c in json.loads(text)]
        assert [json.loads(c.arguments) for c in calls] == expected
    assert tool_call_schema(_request("auto")) is None and tool_call_schema(_request("none")) is None


@pytest.mark.parametrize(
    "template,tool_setting,reasoning_setting,expected",
    [
        ("<tool_call>{{ tools }}</tool_call> <think>", "auto", "auto", ("hermes", "think")),
        ("plain ChatML", "auto", "auto", (None, None)),
        ("plain ChatML", "llama3_json", "think", ("llama3_json", "think")),  # a model tuned for a format its template hides
        ("<tool_call> <think>", "none", "none", (None, None)),
    ],
)
def test_settings_choose_the_parsers(template, tool_setting, reasoning_setting, expected):
    from types import SimpleNamespace

    from bento_llm.runtime import _output_parsers
    from bento_llm.settings import Settings

    settings = Settings(tool_call_parser=tool_setting, reasoning_parser=reasoning_setting)
    assert _output_parsers(settings, SimpleNamespace(chat_template=template)) == expected
    with pytest.raises(ValueError):
        Settings(tool_call_parser="xml")
