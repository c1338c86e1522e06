"""Chat templates written for the tests: the tiny models use the default model's tokenizer,
whose template knows neither tools nor reasoning."""

from __future__ import annotations

from pathlib import Path

# Hermes-style tool calling (the format of Qwen2.5/Qwen3's templates) and Qwen3-style
# reasoning: enable_thinking=false writes an empty <think> block into the prompt;
# think_in_prompt=true opens the block in the prompt, as DeepSeek-R1 distills' templates do.
HERMES_THINKING = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}You may call functions. For each call write a JSON object in <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <arguments-object>}
</tool_call>
The functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}{% if not (loop.last and message.role == 'assistant' and not add_generation_prompt) %}<|im_end|>
{% endif %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% elif think_in_prompt is defined and think_in_prompt %}<think>
{% endif %}{% endif %}"""


def write_chat_template(model_dir: str, template: str) -> str:
    (Path(model_dir) / "chat_template.jinja").write_text(template)
    return model_dir
