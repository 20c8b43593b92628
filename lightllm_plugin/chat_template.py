"""Rendering a conversation with the model's own chat template, with the checks a request must
pass first: shared by the tokenizer process and the offline `LLM`, so both accept and refuse
the same conversations. Needs only the loaded tokenizer, so it sits beside config.py, below
both the server and the engine."""

from __future__ import annotations

from typing import Any

from lightllm_plugin.tool_calls import with_tools_in_system_message

# apply_chat_template's own parameters. Given in chat_template_kwargs they would not be template
# variables but would replace the model's template (a client's Jinja, rendered in the sandbox
# but free to loop for minutes in the tokenizer process) or change what rendering returns.
RENDER_OPTIONS = frozenset({
    "conversation", "chat_template", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def template_takes_tools(template: str | dict[str, str]) -> bool:
    """Whether a chat template reads `tools` (one that does not would drop them silently)."""
    sources = template.values() if isinstance(template, dict) else [template]
    return any("tools" in source for source in sources)


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
) -> tuple[str, list[int]]:
    """A conversation rendered by the model's own chat template, as text and token ids (in
    transformers' sandboxed Jinja environment). A ValueError names the field at fault: no
    messages, no template, a `chat_template_kwargs` key that
    is a rendering option rather than a template variable, a conversation it cannot render."""
    if not messages:
        raise ValueError("messages must not be empty")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("messages: this model has no chat template; send the prompt as text instead")
    if tools and not template_takes_tools(tokenizer.chat_template):
        # the template would drop them: they go into the system message (lightllm_plugin/tool_calls.py)
        messages, tools = with_tools_in_system_message(messages, tools), None
    overriding = sorted(RENDER_OPTIONS.intersection(chat_template_kwargs or {}))
    if overriding:
        raise ValueError(
            f"chat_template_kwargs: {', '.join(overriding)} cannot be set by a request; "
            "chat_template_kwargs are variables of the model's own chat template"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
            **(chat_template_kwargs or {}),
        )
    except Exception as exc:  # jinja raises its own types for a malformed conversation
        raise ValueError(f"messages: the chat template could not render them: {exc}") from None
    # the rendered template already holds any bos token
    return text, tokenizer.encode(text, add_special_tokens=False)
