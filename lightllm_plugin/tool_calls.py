"""Tool calls on any model, in the Hermes format the server's parser reads:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

For a model whose chat template takes no tools, the tool list goes into a system message that
shows each tool's name, description and JSON schema and asks for that format. A forced call
(tool_choice "required" or a named function) is a structural-tag grammar that admits only
well-formed calls of the allowed tools, with arguments matching each tool's schema; with
tool_choice "auto" on such a model the grammar admits free text, and a `<tool_call>` tag, once
started, only as a well-formed call.

Pure python: the HTTP front end builds the constraints, the tokenizer process the prompt.
"""

from __future__ import annotations

import json
from typing import Any

from lightllm_plugin.structured_outputs import StructuredOutputs

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

_INSTRUCTION = (
    "You may call these tools. To call one, answer with\n"
    f'{TOOL_OPEN}\n{{"name": <tool name>, "arguments": <arguments as a JSON object>}}\n{TOOL_CLOSE}\n'
    "with arguments that match its parameters. Tools:"
)


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool)


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's arguments schema; a tool with none takes an empty object."""
    schema = _function(tool).get("parameters")
    return schema if isinstance(schema, dict) and schema else {"type": "object", "properties": {}}


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    lines = [_INSTRUCTION]
    for tool in tools:
        function = _function(tool)
        entry = {"name": function["name"], "description": function.get("description", ""),
                 "parameters": parameters_schema(tool)}
        lines.append(json.dumps(entry, ensure_ascii=False))
    return "\n".join(lines)


def with_tools_in_system_message(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tool list in its system message (a first system message keeps
    its own text, followed by the tools)."""
    prompt = tools_system_prompt(tools)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "content": messages[0]["content"].rstrip() + "\n\n" + prompt}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _call_tag(tool: dict[str, Any]) -> dict[str, Any]:
    name = json.dumps(_function(tool)["name"], ensure_ascii=False)
    return {
        "type": "tag",
        "begin": f'{TOOL_OPEN}\n{{"name": {name}, "arguments": ',
        # at most one blank in a row: a small model left free to indent can loop on blanks
        "content": {"type": "json_schema", "json_schema": parameters_schema(tool), "max_whitespace_cnt": 1},
        "end": f"}}\n{TOOL_CLOSE}",
    }


def tool_call_constraint(tools: list[dict[str, Any]], tool_choice: str, field: str = "tools",
                         parallel: bool = True) -> StructuredOutputs:
    """The grammar of tool_choice "auto", "required", or (any other string) the named tool's call."""
    if tool_choice == "auto":
        fmt = {"type": "triggered_tags", "triggers": [TOOL_OPEN], "tags": [_call_tag(t) for t in tools],
               "at_least_one": False, "stop_after_first": not parallel}
    elif tool_choice == "required":
        fmt = {"type": "tags_with_separator", "tags": [_call_tag(t) for t in tools], "separator": "\n",
               "at_least_one": True, "stop_after_first": not parallel}
    else:
        named = [t for t in tools if _function(t)["name"] == tool_choice]
        fmt = _call_tag(named[0])
    return StructuredOutputs(structural_tag={"type": "structural_tag", "format": fmt}, field=field)
