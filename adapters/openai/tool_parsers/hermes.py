"""Hermes-style tool calls, as Qwen's chat templates ask for them:
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`."""

from __future__ import annotations

import json
import uuid
from typing import Any

from lightllm_plugin.text_stream import partial_suffix_length

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def parse_call(body: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    function = {"name": obj["name"], "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


class HermesToolParser:
    """Splits model output into content and `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
    calls, a piece at a time, so the streamed and the whole answer agree exactly. A call
    whose JSON does not parse, or a tag never closed, stays in the content as text.
    Whitespace right before a call (or after the last one) is dropped."""

    def __init__(self):
        self.buffer = ""  # text not settled yet: a possible tag start, or a call being read
        self.inside = False
        self.held = ""  # trailing whitespace of the content, released only if content follows
        self.num_calls = 0

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to emit now, calls completed now)."""
        self.buffer += piece
        content, calls = "", []
        while True:
            if not self.inside:
                at = self.buffer.find(TOOL_OPEN)
                if at < 0:
                    keep = partial_suffix_length(self.buffer, [TOOL_OPEN])
                    content += self._content(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return content, calls
                content += self._content(self.buffer[:at])
                self.buffer = self.buffer[at + len(TOOL_OPEN) :]
                self.inside = True
            else:
                end = self.buffer.find(TOOL_CLOSE)
                if end < 0:
                    return content, calls
                body, self.buffer = self.buffer[:end], self.buffer[end + len(TOOL_CLOSE) :]
                self.inside = False
                call = parse_call(body)
                if call is None:
                    content += self._content(TOOL_OPEN + body + TOOL_CLOSE)
                else:
                    self.held = ""
                    self.num_calls += 1
                    calls.append(call)

    def finish(self) -> str:
        """Content still held back once the output is complete."""
        rest = (TOOL_OPEN if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        content = self._content(rest)
        if self.num_calls == 0:
            content += self.held
        self.held = ""
        return content

    def _content(self, text: str) -> str:
        text = self.held + text
        settled = text.rstrip()
        self.held = text[len(settled) :]
        return settled
