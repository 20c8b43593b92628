"""/v1/chat/completions: messages in, assistant messages out, tool calls parsed from the text."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.images import image_source
from lightllm_plugin.server.protocol import TokenOutput
from lightllm_plugin.structured_outputs import StructuredOutputs
from lightllm_plugin.tool_calls import tool_call_constraint

from .protocol import (
    ROLES,
    ApiError,
    ChatRequest,
    sampling_params,
    token_strings,
    value_or,
)
from .serving import OpenAIServer
from .streaming import Job, Outputs, collect, respond
from .structured import request_constraint
from .tool_parsers import DEFAULT_TOOL_PARSER, TOOL_PARSERS, parse_tool_calls


def chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: text content as one string, tool-call
    arguments as objects (Hugging Face's convention), `developer` read as `system`."""
    if not messages:
        raise ApiError(400, "messages must not be empty", "messages")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", "messages")
        message = dict(message)
        if message["role"] == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = _content_parts(content, f"{where}.content")
        elif content is None:
            if message["role"] != "assistant":
                raise ApiError(400, f"{where}.content is required for role {message['role']}", "messages")
            message["content"] = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", "messages")
        if message.get("tool_calls"):
            message["tool_calls"] = [_template_tool_call(c) for c in message["tool_calls"]]
        result.append(message)
    return result


def _content_parts(content: list[Any], where: str) -> str | list[dict[str, Any]]:
    """Text parts as one string; with images, the parts in order (the tokenizer process places
    the images: lightllm_plugin/images.py)."""
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        try:
            source = image_source(part, f"{where}[{j}]") if isinstance(part, dict) else None
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from None
        if source is None:
            raise ApiError(400, f"{where}[{j}]: only text and image_url parts are supported", "messages")
        parts.append({"type": "image_url", "image_url": {"url": source}})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _template_tool_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            return call
        return {**call, "function": {**function, "arguments": arguments}}
    return call


def check_tools(tools: list[Any]) -> None:
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function" or not isinstance(
            function.get("name"), str
        ):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")


def chat_tools(req: ChatRequest) -> tuple[list[Any] | None, StructuredOutputs | None]:
    """The tools the prompt shows, and the grammar of a forced call: tool_choice "required" (one
    or more calls of the tools) or {"type": "function", "function": {"name": ...}} (that one)."""
    tool_choice = value_or(req.tool_choice, "auto")
    if tool_choice == "none" or not req.tools:
        if tool_choice not in ("none", "auto"):
            raise ApiError(400, "tool_choice forces a call but the request has no tools", "tool_choice")
        return None, None
    check_tools(req.tools)
    if tool_choice == "auto":
        return req.tools, None
    if tool_choice == "required":
        name = "required"
    else:
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        if name not in {t["function"]["name"] for t in req.tools}:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    # a forced answer is one call unless the client asks for several: left free to go on, a small
    # model tends to call again and again until max_tokens
    parallel = req.parallel_tool_calls is True
    try:
        return req.tools, tool_call_constraint(req.tools, name, field="tools", parallel=parallel)
    except ValueError as exc:
        raise ApiError(400, str(exc), "tools") from None


def check_response_format(response_format: dict[str, Any] | None, messages: list[dict[str, Any]]) -> None:
    """json_object is accepted as OpenAI accepts it: the conversation must ask for JSON (the
    output is then held to JSON by structured.py's constraint)."""
    if response_format is None or response_format.get("type") != "json_object":
        return
    if not any("json" in m["content"].lower() for m in messages if isinstance(m.get("content"), str)):
        raise ApiError(
            400, "'messages' must contain the word 'json' in some form to use response_format json_object", "messages"
        )


def chat_job(req: ChatRequest, config: EngineConfig) -> Job:
    messages = chat_messages(req.messages)
    check_response_format(req.response_format, messages)
    tools, forced = chat_tools(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    renames = {"max_new_tokens": max_name, "min_new_tokens": "min_tokens", "logprobs": "top_logprobs"}
    # unset: whatever the prompt leaves of the request length limit
    room = config.max_req_total_len - config.max_req_input_len
    max_tokens = value_or(req.max_completion_tokens, value_or(req.max_tokens, room))
    logprobs = value_or(req.top_logprobs, 0) if req.logprobs else None
    params = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, renames=renames,
                             constraint=request_constraint(req, ("tool_choice", forced)))
    prompt = {
        "messages": messages, "tools": tools, "chat_template_kwargs": req.chat_template_kwargs, "field": "messages"
    }
    return Job(
        prompts=[prompt],
        params=params,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=logprobs,
        renames=renames,
        tools=tools is not None,
    )


def chat_logprob(out: TokenOutput, k: int) -> dict[str, Any]:
    strings = token_strings(out)
    top = [
        {"token": s, "logprob": lp, "bytes": list(s.encode())}
        for s, (_, lp) in zip(strings[1 : k + 1], (out.top_logprobs or [])[:k])
    ]
    return {"token": strings[0], "logprob": out.logprob, "bytes": list(strings[0].encode()), "top_logprobs": top}


class ChatAnswer:
    """/v1/chat/completions' shapes of a job's outputs; choice i is sample i of the one conversation."""

    def __init__(self, job: Job, head: dict[str, Any]):
        self.job = job
        self.head = head
        self.chunk_head = {**head, "object": "chat.completion.chunk"}
        # streaming: each sample's tool-call parser and the calls it has sent so far
        n = job.params.n
        self.parsers = [TOOL_PARSERS[DEFAULT_TOOL_PARSER]() for _ in range(n)] if job.tools else None
        self.num_calls = [0] * n

    async def whole(self, outputs: Outputs) -> dict[str, Any]:
        job = self.job
        samples, usage = await collect(outputs, job.logprobs is not None)
        choices = []
        for i in range(job.params.n):
            s = samples[(0, i)]
            message: dict[str, Any] = {"role": "assistant", "content": s.text}
            finish = s.finish_reason
            if job.tools:
                message["content"], calls = parse_tool_calls(s.text)
                if calls:
                    message["tool_calls"] = calls
                    finish = "tool_calls" if finish == "stop" else finish
            logprobs = None
            if job.logprobs is not None:
                logprobs = {"content": [chat_logprob(t, job.logprobs) for t in s.tokens], "refusal": None}
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {**self.head, "choices": choices, "usage": usage.body()}

    def opening_choices(self) -> list[dict[str, Any]]:
        return [self._chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(self.job.params.n)]

    def chunk_choice(self, k: int, i: int, out: TokenOutput) -> dict[str, Any] | None:
        finish = out.finish_reason
        delta: dict[str, Any] = {}
        if self.parsers is None:
            content = out.text
        else:
            content, calls = self.parsers[i].feed(out.text)
            if finish is not None:
                content += self.parsers[i].finish()
            if calls:
                delta["tool_calls"] = [{"index": self.num_calls[i] + j, **c} for j, c in enumerate(calls)]
                self.num_calls[i] += len(calls)
            if finish == "stop" and self.num_calls[i]:
                finish = "tool_calls"
        if content:
            delta["content"] = content
        logprobs = None
        if self.job.logprobs is not None:
            logprobs = {"content": [chat_logprob(out, self.job.logprobs)], "refusal": None}
        if delta or logprobs is not None or finish is not None:
            return self._chunk_choice(i, delta, logprobs, finish)
        return None

    @staticmethod
    def _chunk_choice(i: int, delta: dict[str, Any], logprobs=None, finish: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def create_chat_completion(server: OpenAIServer, request: Request) -> Response:
    try:
        req = await server.read(request, ChatRequest)
        server.check_model(req.model)
        job = chat_job(req, server.config)
    except ApiError as exc:
        return server.refused(exc)
    return await respond(server.client, ChatAnswer(job, server.head("chatcmpl", "chat.completion")))
