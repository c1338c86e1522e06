"""Tool calls in model output: Hermes `<tool_call>{json}</tool_call>` (Qwen2.5/3, SmolLM3,
Hermes), Llama 3's bare JSON (`{"name": ..., "parameters": ...}`, optionally after
`<|python_tag|>`, several joined by `;`), and Mistral's `[TOOL_CALLS][{...}, ...]`.

Each parser is a pure function of the text generated so far: `parse(text, finished)` ->
(content, calls). Streaming sends the differences between successive parses, so a streamed
message reassembles to exactly the non-streamed one as long as every parse of a longer text
extends the parse of a shorter one. The rules below are built for that:
- text that might still become part of a tag (a trailing `<tool_` ...) or trailing whitespace
  is held back until the next token decides it;
- a call exists from the moment its `name` is a complete JSON string naming one of the request's
  tools; from then on its arguments are the raw JSON text the model wrote for them (OpenAI's
  arguments are a JSON string the client parses; as OpenAI documents, the model may write
  invalid JSON there, and the client must check);
- a block that closes, or an output that ends, without such a name was not a call: its text
  is content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

_WS = " \t\r\n"
_decoder = json.JSONDecoder()
_ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes/Mistral say arguments, Llama 3 parameters


@dataclass
class ToolCall:
    name: str
    arguments: str  # raw JSON text; a prefix of it while the call is being written


@dataclass
class Parsed:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag` (without being all of it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def tidy(text: str) -> str:
    """Content and reasoning without surrounding whitespace: stripping both ends of a growing
    text is prefix-stable (trailing whitespace is simply sent once something follows it)."""
    return text.strip(_WS)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


@dataclass
class _Object:
    """What is known of a JSON object written from `start`: each key's value span (end None:
    the value runs past the text), and `end` after the closing brace once it is written."""

    values: dict[str, tuple[int, int | None]]
    end: int | None


def _decode_value(text: str, i: int) -> int | None:
    """End of the complete JSON value at text[i], or None while it may still grow."""
    try:
        value, end = _decoder.raw_decode(text, i)
    except ValueError:
        return None
    if end == len(text) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None  # "12" may become "123"
    return end


def scan_object(text: str, i: int) -> _Object:
    """Scan the object starting at text[i] == '{' as far as it is written. Anything that
    cannot continue a JSON object stops the scan (the object never ends)."""
    values: dict[str, tuple[int, int | None]] = {}
    i = _skip_ws(text, i + 1)
    if text.startswith("}", i):
        return _Object(values, i + 1)
    while i < len(text) and text[i] == '"':
        key_end = _decode_value(text, i)
        if key_end is None:
            break
        key = json.loads(text[i:key_end])
        i = _skip_ws(text, key_end)
        if not text.startswith(":", i):
            break
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            break
        end = _decode_value(text, i)
        values[key] = (i, end)
        if end is None:
            break
        i = _skip_ws(text, end)
        if text.startswith(",", i):
            i = _skip_ws(text, i + 1)
        elif text.startswith("}", i):
            return _Object(values, i + 1)
        else:
            break
    return _Object(values, None)


def _held_end(text: str, close_tag: str | None) -> int:
    """Where the written part of an open value ends: before trailing whitespace and before
    what may be the start of the closing tag."""
    end = len(text) - (held_suffix(text, close_tag) if close_tag else 0)
    while end > 0 and text[end - 1] in _WS:
        end -= 1
    return end


def call_from(text: str, obj: _Object, names: frozenset[str], closed_at: int | None, close_tag: str | None) -> ToolCall | None:
    """The call an object describes, or None while (or because) it names no known tool.
    `closed_at`: where the enclosing block ends, if it has ended."""
    name_span = obj.values.get("name")
    if name_span is None or name_span[1] is None:
        return None
    name = json.loads(text[name_span[0]:name_span[1]])
    if not isinstance(name, str) or name not in names:
        return None
    span = next((obj.values[k] for k in _ARGUMENT_KEYS if k in obj.values), None)
    if span is None:
        arguments = "{}" if obj.end is not None or closed_at is not None else ""
    elif span[1] is not None:
        arguments = text[span[0]:span[1]]
    elif closed_at is not None:
        arguments = text[span[0]:closed_at].rstrip(_WS)
    else:
        arguments = text[span[0]:_held_end(text, close_tag)]
    return ToolCall(name, arguments)


class ToolParser:
    """Splits generated text into content and calls to `tool_names`."""

    name = ""

    def __init__(self, tool_names: Iterable[str], parallel: bool = True) -> None:
        self.names = frozenset(tool_names)
        self.parallel = parallel

    def parse(self, text: str, finished: bool) -> Parsed:
        content, calls = self._split(text, finished)
        return Parsed(tidy(content), calls if self.parallel else calls[:1])

    def _split(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number, text around them."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def _split(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while True:
            start = text.find(self.OPEN, pos)
            if start < 0:
                tail = text[pos:]
                content.append(tail if finished else tail[: len(tail) - held_suffix(tail, self.OPEN)])
                return "".join(content), calls
            content.append(text[pos:start])
            body = start + len(self.OPEN)
            close = text.find(self.CLOSE, body)
            ended = close >= 0 or finished
            end = close if close >= 0 else len(text)
            call = self._call(text[:end], body, ended)
            if call is not None:
                calls.append(call)
            elif ended:  # not a call after all: the block is text
                content.append(text[start:end + len(self.CLOSE) if close >= 0 else end])
            if close < 0:
                return "".join(content), calls  # nothing after an open block exists yet
            pos = close + len(self.CLOSE)

    def _call(self, text: str, body: int, ended: bool) -> ToolCall | None:
        i = _skip_ws(text, body)
        if not text.startswith("{", i):
            return None
        return call_from(text, scan_object(text, i), self.names, len(text) if ended else None, self.CLOSE)


class _JSONRunToolParser(ToolParser):
    """Calls written as a run of JSON objects after a tag, or at the very start of the output
    without it; what follows the run is content. A bare run whose first object is not a call
    was an ordinary answer (an answer may be JSON): all of it is content."""

    TAG = ""
    OPENER = "{"  # how a bare run starts
    ARRAY = False  # the objects sit in a JSON array ("[{...}, {...}]")
    SEPARATOR = ";"

    def _split(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        lead = _skip_ws(text, 0)
        rest = text[lead:]
        if rest.startswith(self.TAG):
            start, bare = _skip_ws(text, lead + len(self.TAG)), False
        elif not finished and self.TAG.startswith(rest):
            return "", []  # may still become the tag
        elif rest.startswith(self.OPENER):
            start, bare = lead, True
        else:
            return text, []
        calls, content_from = self._run(text, start, finished)
        if bare and not calls and content_from is not None:
            content_from = 0
        return ("" if content_from is None else text[content_from:]), calls

    def _run(self, text: str, i: int, finished: bool) -> tuple[list[ToolCall], int | None]:
        """The run's calls, and where content starts after it (None: not known yet)."""
        calls: list[ToolCall] = []
        if self.ARRAY:
            if i >= len(text):
                return calls, (i if finished else None)
            if text[i] != "[":
                return calls, i
            i = _skip_ws(text, i + 1)
        while True:
            if i >= len(text):
                return calls, (i if finished else None)
            if text[i] != "{":
                return calls, (i + 1 if self.ARRAY and text[i] == "]" else i)
            obj = scan_object(text, i)
            call = call_from(text, obj, self.names, len(text) if finished else None, None)
            if call is None:
                return calls, (None if obj.end is None and not finished else i)
            calls.append(call)
            if obj.end is None:
                return calls, (len(text) if finished else None)
            i = _skip_ws(text, obj.end)
            if text.startswith(self.SEPARATOR, i):
                i = _skip_ws(text, i + 1)


class Llama3JSONToolParser(_JSONRunToolParser):
    """Llama 3.1-3.3: `{"name": "f", "parameters": {...}}`, optionally after `<|python_tag|>`
    (kept in the text when skip_special_tokens is false), several separated by `;`."""

    name = "llama3_json"
    TAG = "<|python_tag|>"


class MistralToolParser(_JSONRunToolParser):
    """Mistral (v3 tokenizer templates): `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`.
    With skip_special_tokens the tag is dropped from the text; the bare array reads the same."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    OPENER = "["
    ARRAY = True
    SEPARATOR = ","


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser, Llama3JSONToolParser, MistralToolParser)}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser for the format a chat template teaches its model, or None."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "JSON for a function call" in template:
        return "llama3_json"
    return None


class NamedToolParser(ToolParser):
    """tool_choice names a function: structured outputs force the whole output to be its
    arguments (a JSON object for its `parameters` schema), so all of it is that one call."""

    name = "named"

    def __init__(self, function: str) -> None:
        super().__init__([function], parallel=False)
        self.function = function

    def _split(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        return "", [ToolCall(self.function, tidy(text))]


class RequiredToolParser(MistralToolParser):
    """tool_choice "required": structured outputs force a JSON array of
    {"name": ..., "parameters": {...}} objects (tool_call_schema), read as a bare Mistral run."""

    name = "required"
    TAG = "\0"  # never in text: only the bare array
