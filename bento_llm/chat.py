"""Messages -> prompt through the model's own chat template."""

from __future__ import annotations

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


def render_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    messages = []
    for i, message in enumerate(request.messages):
        # "developer" is OpenAI's new name for the system role; templates know "system".
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text(i)})
    return messages


def apply_chat_template(tokenizer: Any, request: ChatCompletionRequest) -> str:
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
