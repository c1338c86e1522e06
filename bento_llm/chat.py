"""Messages -> prompt through the model's own chat template."""

from __future__ import annotations

import json
from typing import Any

from bento_llm.errors import bad_request
from bento_llm.protocol import ChatCompletionRequest

# For checkpoints without a template (tiny test models, base models): ChatML, the format
# SmolLM2, Qwen2 and many others were tuned on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def template_source(tokenizer: Any) -> str:
    """The chat template's text (all of them, where a tokenizer has several), for detecting
    what the model was taught: tool-call formats, reasoning blocks."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def _tool_calls(message: Any, index: int) -> list[dict[str, Any]]:
    # Templates read the arguments as a mapping (`arguments | tojson`, `arguments.items()`),
    # as Hugging Face's convention has it; OpenAI sends them as JSON text.
    calls = []
    for j, call in enumerate(message.tool_calls):
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            raise bad_request(
                "The arguments of a tool call must be JSON text", param=f"messages.[{index}].tool_calls.[{j}].function.arguments"
            ) from None
        calls.append({"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}})
    return calls


def render_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for i, message in enumerate(request.messages):
        # "developer" is OpenAI's new name for the system role; templates know "system".
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": message.text(i)}
        if message.tool_calls:
            entry["tool_calls"] = _tool_calls(message, i)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None and role == "tool":
            entry["name"] = message.name
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        messages.append(entry)
    return messages


def apply_chat_template(tokenizer: Any, request: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None) -> str:
    messages = render_messages(request)
    if request.continue_final_message and messages[-1]["role"] != "assistant":
        raise bad_request(
            "continue_final_message needs the last message to be from the assistant",
            param="continue_final_message",
        )
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
    try:
        prompt = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tools=tools,
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            **(request.chat_template_kwargs or {}),
        )
    except Exception as e:  # templates raise jinja errors for e.g. roles out of order
        raise bad_request(f"The messages do not fit the model's chat template: {e}", param="messages") from None
    if not isinstance(prompt, str):
        raise bad_request("The chat template did not produce a text prompt", param="messages")
    return prompt
