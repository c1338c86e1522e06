"""Reasoning in model output: `<think>...</think>` before the answer, as Qwen3, QwQ and the
DeepSeek-R1 distills write it. Like the tool parsers, a pure function of the text so far whose
results only grow, so streamed deltas reassemble to the non-streamed message.

Where the prompt already opened the block (R1 distills' templates end the generation prompt
with `<think>`), everything up to `</think>` is reasoning; otherwise only an output that starts
with `<think>` reasons (Qwen3 with enable_thinking=false gets an empty block in its prompt and
answers directly). A block never closed (max_tokens ran out while thinking) is all reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

from bento_llm.tool_parsers import held_suffix, tidy

OPEN, CLOSE = "<think>", "</think>"


@dataclass
class Split:
    reasoning: str
    answer: str  # raw: the tool parser (or tidy) takes it from here


class ThinkReasoningParser:
    name = "think"

    def __init__(self, starts_inside: bool) -> None:
        self.starts_inside = starts_inside

    @classmethod
    def for_prompt(cls, prompt: str) -> "ThinkReasoningParser":
        return cls(starts_inside=prompt.rstrip().endswith(OPEN))

    def parse(self, text: str, finished: bool) -> Split:
        lead = len(text) - len(text.lstrip())
        rest = text[lead:]
        if rest.startswith(OPEN):
            start = lead + len(OPEN)
        elif not finished and OPEN.startswith(rest) and (rest or not self.starts_inside):
            return Split("", "")  # may still become "<think>"
        elif self.starts_inside:
            start = 0
        else:
            return Split("", text)
        close = text.find(CLOSE, start)
        if close < 0:
            thought = text[start:]
            if not finished:
                thought = thought[: len(thought) - held_suffix(thought, CLOSE)]
            return Split(tidy(thought), "")
        return Split(tidy(text[start:close]), text[close + len(CLOSE):])


PARSERS = {ThinkReasoningParser.name: ThinkReasoningParser}


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """"think" where the chat template shows the model reasons in <think> blocks."""
    return "think" if OPEN in (chat_template or "") else None
