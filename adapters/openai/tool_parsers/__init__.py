"""Tool-call parsers: each splits a model's output into content and OpenAI tool calls, a piece
at a time, so a stream and a whole answer agree. One file per output format."""

from __future__ import annotations

from typing import Any, Protocol

from .hermes import HermesToolParser


class ToolParser(Protocol):
    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to emit now, calls completed now)."""

    def finish(self) -> str:
        """Content still held back once the output is complete."""


# a format's name -> its parser
TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser}
DEFAULT_TOOL_PARSER = "hermes"


def parse_tool_calls(text: str, parser_name: str = DEFAULT_TOOL_PARSER) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer: (content, or None when it is only calls; the calls)."""
    parser = TOOL_PARSERS[parser_name]()
    content, calls = parser.feed(text)
    content += parser.finish()
    return (content or None) if calls else content, calls
