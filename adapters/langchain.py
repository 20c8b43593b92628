"""LangChain adapter: `LightLLM` (an LLM, /v1/completions) and `ChatLightLLM` (a chat model,
/v1/chat/completions) talking to this engine's OpenAI-compatible routes.

    from lightllm_plugin.adapters.langchain import ChatLightLLM
    chat = ChatLightLLM(base_url="http://127.0.0.1:8000/v1")   # a running server
    chat = ChatLightLLM(model_dir="/models/Qwen2.5-0.5B-Instruct")  # or start (and own) one
    chat.invoke("What is the capital of France?").content

Only langchain-core (and httpx, which it brings) is needed. With no `base_url`, the model
starts `python -m lightllm_plugin.server` for `model_dir` (or `model`; neither: the default
model) on a free local port, waits until it answers, and stops it when it is closed
(`close()`), garbage-collected or the interpreter exits.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

try:
    import httpx
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.language_models.chat_models import LangSmithParams
    from langchain_core.language_models.llms import LLM
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
        convert_to_openai_data_block,
        is_data_content_block,
    )
    from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
    from langchain_core.runnables import Runnable
    from langchain_core.tools import BaseTool
    from langchain_core.utils import from_env, secret_from_env
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lightllm_plugin.adapters.langchain needs langchain-core: pip install 'lightllm-plugin[langchain]'") from exc

STARTUP_TIMEOUT_S = 600.0
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


# ---- a server this process owns ----------------------------------------------------------
class OwnedServer:
    """`python -m lightllm_plugin.server` in a subprocess, stopped by close() or at exit."""

    def __init__(self, model_dir: str | None, server_args: Sequence[str] = (), startup_timeout: float = STARTUP_TIMEOUT_S):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "lightllm_plugin.server", "--host", "127.0.0.1", "--port", str(port)]
        if model_dir:
            cmd += ["--model_dir", model_dir]
        cmd += list(server_args)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                if len(self.lines) < 2000:
                    self.lines.append(line)
                if f"Uvicorn running on {self.url}" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True, name="lightllm-plugin-server-output").start()
        self._finalizer = weakref.finalize(self, _stop_process, self.proc)
        deadline = time.monotonic() + startup_timeout
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = "".join(self.lines[-30:])
                raise RuntimeError(f"the lightllm-plugin server did not start ({' '.join(cmd)}):\n{tail}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self._finalizer()


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: the server stops its children and removes its run dir
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---- the shared part ----------------------------------------------------------------------
class ServerConnection(BaseModel):
    """Where a LangChain object's server is (a URL, or one it starts and owns) and how requests
    reach it: shared by the LLM, the chat model and the embeddings."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    base_url: str | None = Field(default_factory=from_env("LIGHTLLM_BASE_URL", default=None))
    """A running server's OpenAI base URL (`http://host:port/v1`; the bare `http://host:port` works
    too). Default: $LIGHTLLM_BASE_URL, else none (the model starts its own server)."""
    model: str | None = Field(default=None, alias="model_name")
    """The model name sent with each request (default: the one the server serves). With no
    base_url and no model_dir, also the model the owned server loads."""
    model_dir: str | None = None
    """Start and own a server for this model (HF folder or GGUF file) when base_url is not given."""
    server_args: list[str] = Field(default_factory=list)
    """Extra `lightllm-plugin serve` flags for an owned server."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("LIGHTLLM_API_KEY", default=None))
    """Sent as a bearer token. Default: $LIGHTLLM_API_KEY (the variable the server reads its key from)."""
    timeout: float | None = 120.0
    max_retries: int = 2

    _server: OwnedServer | None = PrivateAttr(default=None)
    _served_name: str | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- where the server is
    def _root(self) -> str:
        if self.base_url:
            url = self.base_url.rstrip("/")
            return url if url.endswith("/v1") else url + "/v1"
        with self._lock:
            if self._server is None or not self._server.alive:
                self._server = OwnedServer(self.model_dir or self.model, self.server_args)
        return self._server.url + "/v1"

    def close(self) -> None:
        """Stop the server this model started (if any)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def _headers(self) -> dict[str, str]:
        key = self.api_key.get_secret_value() if self.api_key else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _model_name(self) -> str:
        if self.model and (self.base_url or self.model_dir):
            return self.model
        if self._served_name is None:
            body = self._request_json("GET", "/models", None)
            self._served_name = body["data"][0]["id"]
        return self._served_name

    # -- the request
    def _client_kwargs(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "headers": self._headers()}

    def _request_json(self, method: str, path: str, payload: dict | None) -> dict:
        url = self._root() + path
        for attempt in range(self.max_retries + 1):
            try:
                with httpx.Client(**self._client_kwargs()) as client:
                    response = client.request(method, url, json=payload)
                if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                return _checked(response)
            except httpx.TransportError:
                if attempt >= self.max_retries:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def _arequest_json(self, path: str, payload: dict) -> dict:
        import asyncio

        url = self._root() + path
        for attempt in range(self.max_retries + 1):
            try:
                async with httpx.AsyncClient(**self._client_kwargs()) as client:
                    response = await client.post(url, json=payload)
                if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                    await asyncio.sleep(0.5 * 2**attempt)
                    continue
                return _checked(response)
            except httpx.TransportError:
                if attempt >= self.max_retries:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

class _LightLLMCommon(ServerConnection):
    """The sampling settings and streaming of the LLM and the chat model."""

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | str | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    streaming: bool = False
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Any other request fields (e.g. repetition_penalty, min_p, ignore_eos)."""

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": stop if stop is not None else self.stop,
            **self.model_kwargs,
        }
        params.update({k: v for k, v in kwargs.items() if k not in ("run_manager",)})
        return {k: v for k, v in params.items() if v is not None}

    def _stream_events(self, path: str, payload: dict) -> Iterator[dict]:
        with httpx.Client(**self._client_kwargs()) as client:
            with client.stream("POST", self._root() + path, json=payload) as response:
                if response.status_code != 200:
                    response.read()
                    _checked(response)
                for line in response.iter_lines():
                    event = _sse_data(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        yield event

    async def _astream_events(self, path: str, payload: dict) -> AsyncIterator[dict]:
        async with httpx.AsyncClient(**self._client_kwargs()) as client:
            async with client.stream("POST", self._root() + path, json=payload) as response:
                if response.status_code != 200:
                    await response.aread()
                    _checked(response)
                async for line in response.aiter_lines():
                    event = _sse_data(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        yield event

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "model_dir": self.model_dir,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
            "seed": self.seed,
            **self.model_kwargs,
        }

    def _ls_common(self, kind: str, stop: list[str] | None, kwargs: dict[str, Any]) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="lightllm",
            ls_model_name=kwargs.get("model") or self.model or self.model_dir or self._served_name or "default",
            ls_model_type=kind,
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop if stop is not None else self.stop
        if stop:
            params["ls_stop"] = [stop] if isinstance(stop, str) else list(stop)
        return params


class LightLLMError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"lightllm-plugin server answered {status}: {message}")
        self.status = status


def _checked(response: httpx.Response) -> dict:
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except Exception:
            message = response.text[:500]
        raise LightLLMError(response.status_code, message)
    return response.json()


_DONE = object()


def _sse_data(line: str):
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    return json.loads(data)


def _usage(usage: dict | None) -> UsageMetadata | None:
    if not usage:
        return None
    metadata = UsageMetadata(
        input_tokens=usage.get("prompt_tokens", 0),
        output_tokens=usage.get("completion_tokens", 0),
        total_tokens=usage.get("total_tokens", 0),
    )
    # prompt tokens the server read from its prefix cache, where langchain-openai puts OpenAI's
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        metadata["input_token_details"] = InputTokenDetails(cache_read=cached)
    return metadata


# ---- LLM ------------------------------------------------------------------------------
class LightLLM(_LightLLMCommon, LLM):
    """A text-completion LLM served by lightllm-plugin (/v1/completions)."""

    @property
    def _llm_type(self) -> str:
        return "lightllm"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_common("llm", stop, kwargs)

    def _payload(self, prompt: str, stop: list[str] | None, kwargs: dict, stream: bool) -> dict:
        payload = {"model": self._model_name(), "prompt": prompt, **self._params(stop, kwargs)}
        if stream:
            payload["stream"] = True
        return payload

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
              **kwargs: Any) -> str:
        if self.streaming:
            return "".join(c.text for c in self._stream(prompt, stop, run_manager, **kwargs))
        body = self._request_json("POST", "/completions", self._payload(prompt, stop, kwargs, False))
        return body["choices"][0]["text"]

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            return "".join([c.text async for c in self._astream(prompt, stop, run_manager, **kwargs)])
        body = await self._arequest_json("/completions", self._payload(prompt, stop, kwargs, False))
        return body["choices"][0]["text"]

    @staticmethod
    def _chunk(event: dict) -> GenerationChunk | None:
        choices = event.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        info = {"finish_reason": choice["finish_reason"]} if choice.get("finish_reason") else None
        return GenerationChunk(text=choice.get("text") or "", generation_info=info)

    def _stream(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        for event in self._stream_events("/completions", self._payload(prompt, stop, kwargs, True)):
            chunk = self._chunk(event)
            if chunk is None:
                continue
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for event in self._astream_events("/completions", self._payload(prompt, stop, kwargs, True)):
            chunk = self._chunk(event)
            if chunk is None:
                continue
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


# ---- chat model --------------------------------------------------------------------------
def _content(content: Any) -> Any:
    """Text blocks as one string; with images, OpenAI content parts: LangChain's standard image
    blocks through langchain-core's own converter, OpenAI `image_url` parts as they are."""
    if not isinstance(content, list):
        return content
    parts: list[dict[str, Any]] = []
    for p in content:
        if isinstance(p, str):
            parts.append({"type": "text", "text": p})
        elif p.get("type") == "text":
            parts.append({"type": "text", "text": p.get("text", "")})
        elif p.get("type") == "image_url":
            parts.append({"type": "image_url", "image_url": p["image_url"]})
        elif p.get("type") == "image" and is_data_content_block(p):
            parts.append(convert_to_openai_data_block(p))
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def message_to_dict(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as an OpenAI chat message."""
    content = _content(message.content)
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content}
    if isinstance(message, HumanMessage):
        out = {"role": "user", "content": content}
    elif isinstance(message, AIMessage):
        out = {"role": "assistant", "content": content}
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
                for c in message.tool_calls
            ]
    elif isinstance(message, ToolMessage):
        return {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
    elif isinstance(message, ChatMessage):
        out = {"role": message.role, "content": content}
    else:
        raise ValueError(f"unsupported message type {type(message).__name__}")
    if message.name:
        out["name"] = message.name
    return out


def _tool_calls(raw: list[dict] | None) -> tuple[list[dict], list[dict]]:
    """OpenAI tool calls -> (LangChain tool_calls, invalid_tool_calls)."""
    calls, invalid = [], []
    for c in raw or []:
        function = c.get("function") or {}
        try:
            args = json.loads(function.get("arguments") or "{}")
            calls.append({"name": function.get("name"), "args": args, "id": c.get("id"), "type": "tool_call"})
        except ValueError as exc:
            invalid.append({"name": function.get("name"), "args": function.get("arguments"), "id": c.get("id"),
                            "error": str(exc), "type": "invalid_tool_call"})
    return calls, invalid


def chat_result(body: dict) -> ChatResult:
    """A /v1/chat/completions response as a ChatResult."""
    generations = []
    for choice in body["choices"]:
        message = choice["message"]
        calls, invalid = _tool_calls(message.get("tool_calls"))
        ai = AIMessage(
            content=message.get("content") or "",
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=_usage(body.get("usage")),
            response_metadata={"finish_reason": choice.get("finish_reason"), "model_name": body.get("model"),
                               "model_provider": "lightllm"},
            id=body.get("id"),
        )
        generations.append(ChatGeneration(message=ai, generation_info={"finish_reason": choice.get("finish_reason")}))
    return ChatResult(generations=generations, llm_output={"model_name": body.get("model"), "token_usage": body.get("usage")})


def chat_chunk(event: dict) -> ChatGenerationChunk | None:
    """One /v1/chat/completions stream event as a chunk (None: nothing in it)."""
    usage = _usage(event.get("usage"))
    choices = event.get("choices") or []
    if not choices:
        if usage is None:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage, id=event.get("id")))
    choice = choices[0]
    delta = choice.get("delta") or {}
    chunks = [
        tool_call_chunk(name=(c.get("function") or {}).get("name"), args=(c.get("function") or {}).get("arguments"),
                        id=c.get("id"), index=c.get("index"))
        for c in delta.get("tool_calls") or []
    ]
    metadata: dict[str, Any] = {"model_provider": "lightllm"}
    info = None
    if choice.get("finish_reason"):
        metadata.update(finish_reason=choice["finish_reason"], model_name=event.get("model"))
        info = {"finish_reason": choice["finish_reason"]}
    message = AIMessageChunk(content=delta.get("content") or "", tool_call_chunks=chunks, usage_metadata=usage,
                             response_metadata=metadata, id=event.get("id"))
    return ChatGenerationChunk(message=message, generation_info=info)


def openai_tool_choice(tool_choice: dict | str | bool) -> dict | str:
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice == "auto" or isinstance(tool_choice, dict):
        return tool_choice
    return {"type": "function", "function": {"name": tool_choice}}


class ChatLightLLM(_LightLLMCommon, BaseChatModel):
    """A chat model served by lightllm-plugin (/v1/chat/completions), tools included."""

    stream_usage: bool = True
    """Ask for usage in the last stream event (stream_options.include_usage)."""

    @property
    def _llm_type(self) -> str:
        return "lightllm-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_common("chat", stop, kwargs)

    def _payload(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict, stream: bool) -> dict:
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None) or self._model_name()
        payload = {"model": model, "messages": [message_to_dict(m) for m in messages], **self._params(stop, kwargs)}
        if stream:
            payload["stream"] = True
            if self.stream_usage:
                payload["stream_options"] = {"include_usage": True}
        return payload

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream

            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        return chat_result(self._request_json("POST", "/chat/completions", self._payload(messages, stop, kwargs, False)))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import agenerate_from_stream

            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        return chat_result(await self._arequest_json("/chat/completions", self._payload(messages, stop, kwargs, False)))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for event in self._stream_events("/chat/completions", self._payload(messages, stop, kwargs, True)):
            chunk = chat_chunk(event)
            if chunk is None:
                continue
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for event in self._astream_events("/chat/completions", self._payload(messages, stop, kwargs, True)):
            chunk = chat_chunk(event)
            if chunk is None:
                continue
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | Literal["auto", "none", "any", "required"] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools go to the server as OpenAI tools (on any model: a chat template that takes none gets
        them in its system message). tool_choice as ChatOpenAI sends it: "any"/True force a call
        ("required"), a tool's name forces that tool."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = openai_tool_choice(tool_choice)
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """The answer as `schema` (a pydantic class gives an instance, else a dict), held to it by the
        server's grammar: "json_schema" (the default, as ChatOpenAI's) sends it as response_format
        json_schema, "function_calling" forces a call of one tool made from it, "json_mode" sends
        response_format json_object (the prompt must then ask for JSON)."""
        from operator import itemgetter

        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
        from langchain_core.runnables import RunnableMap, RunnablePassthrough
        from langchain_core.utils.function_calling import convert_to_json_schema

        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        traced = {"kwargs": {"method": method}, "schema": schema}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=traced)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_model
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                json_schema = convert_to_json_schema(schema)
                response_format = {"type": "json_schema", "json_schema": {
                    "name": json_schema.get("title", "output"), "schema": json_schema, "strict": strict}}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=traced)
            parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")

# the embeddings live in their own module; importable from here beside the chat model
from .langchain_embeddings import LightLLMEmbeddings  # noqa: E402,F401
