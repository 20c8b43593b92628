"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Point any OpenAI SDK at http://HOST:PORT/v1. A request runs through the same
AsyncEngineClient as the native routes; this module only translates OpenAI's request
fields into SamplingParams and the token stream back into OpenAI's response shapes.
vLLM's extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens, chat_template_kwargs) are accepted too, as the SDK
sends them through `extra_body`. Every error is {"error": {message, type, param, code}}
with the status that makes the SDK raise its matching exception class.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.plugins import hookimpl
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.engine_client import AsyncEngineClient, RequestRejected
from lightllm_plugin.server.http_util import (
    BadRequest,
    DisconnectAbortingStream,
    json_body_openapi,
    nullable,
    openai_error,
    read_json_body,
)
from lightllm_plugin.server.protocol import TokenOutput

OWNER = "lightllm-plugin"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---- errors ------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return openai_error(self.status, self.message, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return Response(
            msgspec.json.encode(self.body()), status_code=self.status, media_type="application/json", headers=headers
        )


_LEADING_NAME = re.compile(r"^`?([A-Za-z_][\w.\[\]]*)")


def invalid(message: str, status: int = 400, renames: dict[str, str] | None = None) -> ApiError:
    """An error from a message that starts with the field it concerns ("temperature must be
    >= 0"); the engine's field names are put back into the names this client used. `param`
    is that field when it is one of the request's fields, else null (a message such as "the
    body is not valid JSON" or "Expected `object`, got `array`" names no field)."""
    for ours, theirs in (renames or {}).items():
        message = re.sub(rf"\b{ours}\b", theirs, message)
    match = _LEADING_NAME.match(message) if status < 500 else None
    param = re.sub(r"\[\d+\]", "", match.group(1)) if match else None
    if param is not None and re.split(r"[.\[]", param, maxsplit=1)[0] not in _request_fields():
        param = None
    return ApiError(status, message, param)


# ---- requests ----------------------------------------------------------------------------
class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = False


class _Request(msgspec.Struct, kw_only=True):
    """Fields both endpoints take. Unknown fields are ignored, null means the default."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None


class CompletionRequest(_Request, kw_only=True):
    prompt: Any  # a string, strings, token ids or lists of token ids: checked by completion_prompts
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Request, kw_only=True):
    messages: list[Any]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def _request_fields() -> frozenset[str]:
    return frozenset(CompletionRequest.__struct_fields__) | frozenset(ChatRequest.__struct_fields__)


def _pick(value, default):
    return default if value is None else value


def sampling_params(req: _Request, *, max_tokens: int, logprobs: int | None, renames: dict[str, str]) -> SamplingParams:
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    try:
        return SamplingParams(
            n=_pick(req.n, 1),
            temperature=_pick(req.temperature, 1.0),
            top_p=_pick(req.top_p, 1.0),
            top_k=_pick(req.top_k, -1),
            min_p=_pick(req.min_p, 0.0),
            repetition_penalty=_pick(req.repetition_penalty, 1.0),
            presence_penalty=_pick(req.presence_penalty, 0.0),
            frequency_penalty=_pick(req.frequency_penalty, 0.0),
            max_new_tokens=max_tokens,
            min_new_tokens=_pick(req.min_tokens, 0),
            ignore_eos=_pick(req.ignore_eos, False),
            stop_token_ids=list(req.stop_token_ids or []),
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            seed=req.seed,
            # the detokenizer renders token strings only when top alternatives are asked for,
            # so ask for at least one and show the client the number it asked for
            logprobs=None if logprobs is None else max(1, logprobs),
            skip_special_tokens=_pick(req.skip_special_tokens, True),
        )
    except ValueError as exc:
        raise invalid(str(exc), renames=renames) from None


def completion_prompts(prompt: Any) -> list[dict[str, Any]]:
    """The prompt field as one generate() input per prompt."""
    if isinstance(prompt, str):
        return [{"prompt": prompt, "field": "prompt"}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [{"prompt": p, "field": f"prompt[{i}]"} for i, p in enumerate(prompt)]
        if all(type(t) is int for t in prompt):
            return [{"prompt_ids": prompt, "field": "prompt"}]
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
            return [{"prompt_ids": p, "field": f"prompt[{i}]"} for i, p in enumerate(prompt)]
    raise ApiError(
        400, "prompt must be a non-empty string, list of strings, list of token ids or list of token-id lists", "prompt"
    )


_ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: text content as one string, tool-call
    arguments as objects (Hugging Face's convention), `developer` read as `system`."""
    if not messages:
        raise ApiError(400, "messages must not be empty", "messages")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(_ROLES)}", "messages")
        message = dict(message)
        if message["role"] == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}.content: only text parts are supported", "messages")
                parts.append(part["text"])
            message["content"] = "".join(parts)
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


def check_response_format(response_format: dict[str, Any] | None, messages: list[dict[str, Any]]) -> None:
    """json_object is accepted as OpenAI accepts it (the conversation must ask for JSON);
    the output itself is not constrained."""
    if response_format is None:
        return
    kind = response_format.get("type")
    if kind == "text":
        return
    if kind != "json_object":
        raise ApiError(400, f"response_format.type must be 'text' or 'json_object', got {kind!r}", "response_format")
    if not any("json" in m["content"].lower() for m in messages if isinstance(m.get("content"), str)):
        raise ApiError(
            400, "'messages' must contain the word 'json' in some form to use response_format json_object", "messages"
        )


# ---- tool calls (Hermes / Qwen style) ------------------------------------------------------
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _parse_call(body: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": obj["name"], "arguments": arguments}}


class ToolCallParser:
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
                    keep = _partial_tag(self.buffer, TOOL_OPEN)
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
                call = _parse_call(body)
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


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer: (content, or None when it is only calls; the calls)."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    content += parser.finish()
    return (content or None) if calls else content, calls


# ---- running requests ----------------------------------------------------------------------
@dataclass
class Job:
    prompts: list[dict[str, Any]]  # generate() keyword arguments, one per prompt
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token the client asked for; None: no logprobs
    renames: dict[str, str]  # engine field name -> the client's
    echo: list[str] = field(default_factory=list)  # completions: text put before each prompt's answers
    tools: bool = False  # parse tool calls out of the answers


@dataclass
class Sample:
    text: str = ""
    finish_reason: str | None = None
    output_len: int = 0
    tokens: list[TokenOutput] = field(default_factory=list)


async def merged(
    client: AsyncEngineClient, job: Job
) -> AsyncIterator[tuple[int, int, TokenOutput]]:
    """(prompt index, sample index, output) for all prompts, as the tokens come. Closing
    this closes every prompt's stream, which aborts what is still running."""
    # OpenAI clients expect prompt + max_tokens over the context to be refused, not shortened
    streams = [client.generate(job.params, lower_max_new_tokens=False, **p) for p in job.prompts]
    if len(streams) == 1:
        try:
            async for index, out in streams[0]:
                yield 0, index, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream) -> None:
        try:
            async for index, out in stream:
                queue.put_nowait((k, index, out))
        except Exception as exc:  # RequestRejected, or the pipeline's failure
            queue.put_nowait(exc)
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def usage(prompt_lens: dict[int, int], samples: dict[tuple[int, int], Sample]) -> dict[str, int]:
    prompt_tokens = sum(prompt_lens.values())
    completion_tokens = sum(s.output_len for s in samples.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _token_strings(out: TokenOutput) -> list[str]:
    return out.logprob_tokens or [""] * (1 + len(out.top_logprobs or []))


def chat_logprob(out: TokenOutput, k: int) -> dict[str, Any]:
    strings = _token_strings(out)
    top = [
        {"token": s, "logprob": lp, "bytes": list(s.encode())}
        for s, (_, lp) in zip(strings[1 : k + 1], (out.top_logprobs or [])[:k])
    ]
    return {"token": strings[0], "logprob": out.logprob, "bytes": list(strings[0].encode()), "top_logprobs": top}


def completion_logprobs(tokens: list[TokenOutput], k: int, offset: int) -> dict[str, Any]:
    """The legacy shape: parallel lists; each top dict holds the top k and the chosen token."""
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for out in tokens:
        strings = _token_strings(out)
        top = {s: lp for s, (_, lp) in zip(strings[1 : k + 1], (out.top_logprobs or [])[:k])}
        top.setdefault(strings[0], out.logprob)
        result["tokens"].append(strings[0])
        result["token_logprobs"].append(out.logprob)
        result["top_logprobs"].append(top)
        result["text_offset"].append(offset)
        offset += len(strings[0])
    return result


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


# ---- the routes --------------------------------------------------------------------------
class OpenAIServer:
    def __init__(self, client: AsyncEngineClient, config: EngineConfig):
        from lightllm_plugin import __version__

        self.client = client
        self.config = config
        self.model_name = config.model_name()
        self.created = int(time.time())
        digest = hashlib.sha256(f"{__version__}|{config.resolved_model_path}|{config.resolved_dtype}".encode())
        self.fingerprint = f"fp_{digest.hexdigest()[:10]}"

    # -- shared
    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "root": self.config.resolved_model_path or self.model_name,
            "parent": None,
            "max_model_len": self.config.max_req_total_len,
        }

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`", "model", "model_not_found")

    async def read(self, request: Request, schema):
        try:
            return await read_json_body(request, schema)
        except BadRequest as exc:
            raise invalid(exc.message, exc.status) from None

    def head(self, prefix: str, obj: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
        }

    def refused(self, exc: ApiError) -> Response:
        self.client.metrics.requests_rejected.inc(status=str(exc.status))
        return exc.response()

    async def run(self, job: Job, respond, stream_events) -> Response:
        """Start the job; a refusal before the first token is an error response, not a broken stream."""
        outputs = merged(self.client, job)
        try:
            first = await anext(outputs)
        except RequestRejected as exc:
            await outputs.aclose()
            return invalid(exc.message, exc.status, job.renames).response(exc.headers)
        if not job.stream:
            try:
                return await respond(first, outputs)
            except RequestRejected as exc:
                return invalid(exc.message, exc.status, job.renames).response(exc.headers)
            finally:
                await outputs.aclose()

        async def events():
            try:
                async for event in stream_events(first, outputs):
                    yield event
            except RequestRejected as exc:  # the pipeline stopped mid-answer
                yield sse(invalid(exc.message, exc.status, job.renames).body())
            finally:
                await outputs.aclose()
            yield DONE

        return DisconnectAbortingStream(events(), media_type="text/event-stream")

    @staticmethod
    async def collect(first, outputs, keep_tokens: bool):
        samples: dict[tuple[int, int], Sample] = {}
        prompt_lens: dict[int, int] = {}

        async def chain():
            yield first
            async for item in outputs:
                yield item

        async for k, i, out in chain():
            sample = samples.setdefault((k, i), Sample())
            sample.text += out.text
            sample.finish_reason = out.finish_reason
            sample.output_len = out.output_len
            prompt_lens[k] = out.prompt_len
            if keep_tokens:
                sample.tokens.append(out)
        return samples, prompt_lens

    # -- /v1/completions
    async def completions(self, request: Request) -> Response:
        try:
            req = await self.read(request, CompletionRequest)
            self.check_model(req.model)
            job = self.completion_job(req)
        except ApiError as exc:
            return self.refused(exc)
        head = self.head("cmpl", "text_completion")
        n = job.params.n

        def choice(k: int, i: int, text: str, tokens: list[TokenOutput], finish: str | None, offset: int):
            logprobs = None if job.logprobs is None else completion_logprobs(tokens, job.logprobs, offset)
            return {"index": k * n + i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        async def respond(first, outputs):
            samples, prompt_lens = await self.collect(first, outputs, job.logprobs is not None)
            choices = []
            for k in range(len(job.prompts)):
                echo = job.echo[k] if job.echo else ""
                for i in range(n):
                    s = samples[(k, i)]
                    choices.append(choice(k, i, echo + s.text, s.tokens, s.finish_reason, len(echo)))
            body = {**head, "choices": choices, "usage": usage(prompt_lens, samples)}
            return Response(msgspec.json.encode(body), media_type="application/json")

        async def stream_events(first, outputs):
            samples: dict[tuple[int, int], Sample] = {}
            prompt_lens: dict[int, int] = {}
            offsets: dict[tuple[int, int], int] = {}

            async def chain():
                yield first
                async for item in outputs:
                    yield item

            async for k, i, out in chain():
                sample = samples.setdefault((k, i), Sample())
                text = out.text
                if (k, i) not in offsets and job.echo:
                    text = job.echo[k] + text
                offset = offsets.get((k, i), len(job.echo[k]) if job.echo else 0)
                offsets[(k, i)] = offset + len(_token_strings(out)[0])
                sample.output_len, prompt_lens[k] = out.output_len, out.prompt_len
                if not text and job.logprobs is None and out.finish_reason is None:
                    continue
                tokens = [out] if job.logprobs is not None else []
                yield sse({**head, "choices": [choice(k, i, text, tokens, out.finish_reason, offset)], "usage": None})
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompt_lens, samples)})

        return await self.run(job, respond, stream_events)

    def completion_job(self, req: CompletionRequest) -> Job:
        prompts = completion_prompts(req.prompt)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != _pick(req.n, 1):
            raise ApiError(400, "best_of must equal n (best-of ranking is not supported)", "best_of")
        echo: list[str] = []
        if req.echo:
            if req.logprobs is not None:
                raise ApiError(400, "echo with logprobs needs prompt logprobs, which this server does not compute", "echo")
            if any("prompt" not in p for p in prompts):
                raise ApiError(400, "echo is supported for text prompts only", "echo")
            echo = [p["prompt"] for p in prompts]
        renames = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
        max_tokens = _pick(req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        params = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, renames=renames)
        return Job(
            prompts=prompts,
            params=params,
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=req.logprobs,
            renames=renames,
            echo=echo,
        )

    # -- /v1/chat/completions
    async def chat_completions(self, request: Request) -> Response:
        try:
            req = await self.read(request, ChatRequest)
            self.check_model(req.model)
            job = self.chat_job(req)
        except ApiError as exc:
            return self.refused(exc)
        head = self.head("chatcmpl", "chat.completion")
        n = job.params.n

        async def respond(first, outputs):
            samples, prompt_lens = await self.collect(first, outputs, job.logprobs is not None)
            choices = []
            for i in range(n):
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
            body = {**head, "choices": choices, "usage": usage(prompt_lens, samples)}
            return Response(msgspec.json.encode(body), media_type="application/json")

        chunk_head = {**head, "object": "chat.completion.chunk"}

        def chunk(i: int, delta: dict[str, Any], logprobs=None, finish: str | None = None) -> bytes:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse({**chunk_head, "choices": [choice], "usage": None})

        async def stream_events(first, outputs):
            samples = {(0, i): Sample() for i in range(n)}
            prompt_lens: dict[int, int] = {}
            parsers = [ToolCallParser() for _ in range(n)] if job.tools else None
            num_calls = [0] * n
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})

            async def chain():
                yield first
                async for item in outputs:
                    yield item

            async for _, i, out in chain():
                sample = samples[(0, i)]
                sample.output_len, prompt_lens[0] = out.output_len, out.prompt_len
                finish = out.finish_reason
                delta: dict[str, Any] = {}
                if parsers is None:
                    content = out.text
                else:
                    content, calls = parsers[i].feed(out.text)
                    if finish is not None:
                        content += parsers[i].finish()
                    if calls:
                        delta["tool_calls"] = [{"index": num_calls[i] + j, **c} for j, c in enumerate(calls)]
                        num_calls[i] += len(calls)
                    if finish == "stop" and num_calls[i]:
                        finish = "tool_calls"
                if content:
                    delta["content"] = content
                logprobs = None
                if job.logprobs is not None:
                    logprobs = {"content": [chat_logprob(out, job.logprobs)], "refusal": None}
                if delta or logprobs is not None or finish is not None:
                    yield chunk(i, delta, logprobs, finish)
            if job.include_usage:
                yield sse({**chunk_head, "choices": [], "usage": usage(prompt_lens, samples)})

        return await self.run(job, respond, stream_events)

    def chat_job(self, req: ChatRequest) -> Job:
        messages = chat_messages(req.messages)
        check_response_format(req.response_format, messages)
        tool_choice = _pick(req.tool_choice, "auto")
        if tool_choice not in ("auto", "none"):
            raise ApiError(400, "tool_choice must be 'auto' or 'none' (forcing a call is not supported)", "tool_choice")
        tools = req.tools if req.tools and tool_choice == "auto" else None
        if tools:
            check_tools(tools)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        renames = {"max_new_tokens": max_name, "min_new_tokens": "min_tokens", "logprobs": "top_logprobs"}
        # unset: whatever the prompt leaves of the request length limit
        room = self.config.max_req_total_len - self.config.max_req_input_len
        max_tokens = _pick(req.max_completion_tokens, _pick(req.max_tokens, room))
        logprobs = _pick(req.top_logprobs, 0) if req.logprobs else None
        params = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, renames=renames)
        prompt = {"messages": messages, "tools": tools, "chat_template_kwargs": req.chat_template_kwargs, "field": "messages"}
        return Job(
            prompts=[prompt],
            params=params,
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=logprobs,
            renames=renames,
            tools=tools is not None,
        )


# ---- the OpenAPI document -----------------------------------------------------------------
TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": list(_ROLES)},
        # null only for an assistant message that carries tool_calls
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}, {"type": "null"}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "tool_call_id": {"type": "string"},
    },
}


def request_body_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    """openapi_extra of /v1/completions and /v1/chat/completions: the bodies' structs, with
    the values the checks after decoding accept. Documentation only."""
    from lightllm_plugin.sampling_params import ACCEPTED
    from lightllm_plugin.server.engine_client import MAX_SAMPLES

    shared = {name: nullable(ACCEPTED[name]) for name in (
        "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "seed", "stop_token_ids", "stop")}
    shared |= {
        "max_tokens": nullable(ACCEPTED["max_new_tokens"]),
        "min_tokens": nullable(ACCEPTED["min_new_tokens"]),
        "n": nullable({"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES}),
        "logit_bias": nullable({"type": "object", "maxProperties": 0, "description": "not supported"}),
    }
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
    prompt = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        token_ids,
        {"type": "array", "minItems": 1, "items": token_ids},
    ]}
    completion = json_body_openapi(CompletionRequest, documented={"CompletionRequest": {
        **shared, "prompt": prompt, "logprobs": nullable(ACCEPTED["logprobs"]),
        "suffix": nullable({"type": "string", "maxLength": 0, "description": "not supported"}),
    }})
    chat = json_body_openapi(ChatRequest, documented={"ChatRequest": {
        **shared,
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "max_completion_tokens": nullable(ACCEPTED["max_new_tokens"]),
        "top_logprobs": nullable(ACCEPTED["logprobs"]),
        "tool_choice": nullable({"enum": ["auto", "none"]}),
    }})
    return completion, chat


@hookimpl(tryfirst=True)
def register_routes(app: FastAPI, engine: AsyncEngineClient, config: EngineConfig) -> None:
    """The built-in plugin "openai": the /v1 routes (see lightllm_plugin.plugins)."""
    server = OpenAIServer(engine, config)
    router = APIRouter(prefix="/v1")
    completion_doc, chat_doc = request_body_docs()

    @router.get("/models")
    async def list_models():
        return Response(msgspec.json.encode({"object": "list", "data": [server.model_card()]}), media_type="application/json")

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != server.model_name:
            return ApiError(404, f"The model `{model_id}` does not exist", "model", "model_not_found").response()
        return Response(msgspec.json.encode(server.model_card()), media_type="application/json")

    @router.post("/completions", openapi_extra=completion_doc)
    async def completions(request: Request):
        return await server.completions(request)

    @router.post("/chat/completions", openapi_extra=chat_doc)
    async def chat_completions(request: Request):
        return await server.chat_completions(request)

    app.include_router(router)
