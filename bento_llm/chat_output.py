"""Generated text -> the assistant message (reasoning, content, tool calls), whole or as
stream deltas in OpenAI's shape.

Streaming sends, per choice, the differences between the message parsed from the text so far
and what was already sent; the parsers guarantee that a longer text only extends the message
(see bento_llm/tool_parsers.py), so the reassembled stream equals the non-streamed message."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from bento_llm.reasoning import ThinkReasoningParser
from bento_llm.tool_parsers import ToolCall, ToolParser, tidy

logger = logging.getLogger("bento_llm")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Message:
    content: str
    reasoning: str | None = None  # None: no reasoning parser
    calls: list[ToolCall] = field(default_factory=list)


@dataclass
class OutputParser:
    reasoning: ThinkReasoningParser | None = None
    tools: ToolParser | None = None

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def parse(self, text: str, finished: bool) -> Message:
        if not self.active:
            return Message(text)  # the text exactly as generated
        reasoning = None
        if self.reasoning is not None:
            split = self.reasoning.parse(text, finished)
            reasoning, text = split.reasoning, split.answer
        if self.tools is None:
            return Message(tidy(text), reasoning)
        parsed = self.tools.parse(text, finished)
        return Message(parsed.content, reasoning, parsed.calls)


def finish_reason(engine_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and engine_reason == "stop" else engine_reason


def message_body(message: Message, parser: OutputParser) -> dict[str, Any]:
    """The non-streamed `message` object."""
    body: dict[str, Any] = {"role": "assistant", "content": message.content, "refusal": None}
    if message.calls:
        body["content"] = message.content or None  # OpenAI's: null next to tool calls
        body["tool_calls"] = [
            {"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.calls
        ]  # fmt: skip
    if parser.reasoning is not None:
        body["reasoning_content"] = message.reasoning or None
    return body


class MessageStream:
    """One choice's deltas: feed it the cumulative text, get the delta to send."""

    def __init__(self, parser: OutputParser) -> None:
        self.parser = parser
        self.sent: dict[str, str] = {"content": "", "reasoning_content": ""}
        self.call_ids: list[str] = []
        self.call_args: list[str] = []

    def _more(self, sent: str, now: str, what: str) -> tuple[str, str]:
        """(the new part of `now`, what is sent after it)."""
        if now.startswith(sent):
            return now[len(sent):], now
        # The parsers are built never to get here; if one does, send nothing rather than a
        # stream that no longer adds up.
        logger.warning("%s of a streamed message changed after it was sent; not streaming the change", what)
        return "", sent

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        if not self.parser.active:  # the message is the text: what the general path gives, per token cheaper
            new, self.sent["content"] = self._more(self.sent["content"], text, "content")
            return {"content": new} if new else {}
        message = self.parser.parse(text, finished)
        delta: dict[str, Any] = {}
        for key, value in (("reasoning_content", message.reasoning), ("content", message.content)):
            if value is not None:
                new, self.sent[key] = self._more(self.sent[key], value, key)
                if new:
                    delta[key] = new
        calls = []
        for i, call in enumerate(message.calls):
            if i == len(self.call_ids):
                self.call_ids.append(call_id())
                self.call_args.append("")
                new, self.call_args[i] = self._more("", call.arguments, "tool call arguments")
                function = {"name": call.name, "arguments": new}
                calls.append({"index": i, "id": self.call_ids[i], "type": "function", "function": function})
                continue
            new, self.call_args[i] = self._more(self.call_args[i], call.arguments, "tool call arguments")
            if new:
                calls.append({"index": i, "function": {"arguments": new}})
        if calls:
            delta["tool_calls"] = calls
        return delta

    @property
    def called(self) -> bool:
        return bool(self.call_ids)
