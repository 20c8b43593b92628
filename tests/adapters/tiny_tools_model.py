"""A tiny random-weight Qwen2 checkpoint whose chat template takes tools: the structure of
tool requests (tools rendered into the prompt, tool calls and results in a conversation) can
be checked end to end with it, though its random weights never answer with a real call."""

from __future__ import annotations

from pathlib import Path

from support.model_plugin import build_tiny_checkpoint

# a Hermes/Qwen-style template: the tools go into the system turn, calls are <tool_call> JSON
TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def build_tiny_tools_model(folder: Path) -> str:
    """Write the checkpoint (the default model's tokenizer with TEMPLATE) into `folder`."""
    return build_tiny_checkpoint(folder, "Qwen2ForCausalLM", family="Qwen2", chat_template=TEMPLATE)
