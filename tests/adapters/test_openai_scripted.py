"""The /v1 routes over a scripted engine client: the model 'says' fixed text, so tool calls
go through the real HTTP routes and the real SDK's parsing, streamed and not."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
from fastapi import FastAPI

from lightllm_plugin.adapters.openai import register_routes
from lightllm_plugin.config import EngineConfig
from lightllm_plugin.server.metrics import ServerMetrics
from lightllm_plugin.server.protocol import TokenOutput

SAID = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
       '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("get_weather", "get_time")]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]


class ScriptedClient:
    """Says SAID in 5-character tokens, after a 7-token prompt, for each of n samples."""

    def __init__(self):
        self.metrics = ServerMetrics()
        self.requests = []

    async def generate(self, params, **prompt):
        self.requests.append((params, prompt))
        pieces = [SAID[i:i + 5] for i in range(0, len(SAID), 5)]
        for i in range(params.n):
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                yield i, TokenOutput(req_id=i, token_id=k, text=piece, logprob=None, top_logprobs=None,
                                     special=False, finish_reason="stop" if last else None,
                                     output_len=k + 1, prompt_len=7)
                await asyncio.sleep(0)


def run(coro_fn):
    engine = ScriptedClient()
    app = FastAPI()
    register_routes(app, engine, EngineConfig(model_dir="/m/scripted", max_req_total_len=512, max_req_input_len=256))
    transport = httpx.ASGITransport(app=app)

    async def main():
        async with openai.AsyncOpenAI(
            base_url="http://test/v1", api_key="x", max_retries=0,
            http_client=httpx.AsyncClient(transport=transport, base_url="http://test/v1"),
        ) as client:
            return await coro_fn(client)

    return asyncio.run(main()), engine


def _calls(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


WANT = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]


def test_tool_calls_in_the_whole_answer():
    r, engine = run(lambda c: c.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, n=2))
    assert [choice.index for choice in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Checking."
        assert _calls(choice.message.tool_calls) == WANT
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 2 * len(range(0, len(SAID), 5))
    _, prompt = engine.requests[0]
    assert prompt["tools"] == TOOLS and prompt["messages"] == ASK


def test_tool_calls_streamed_as_deltas():
    async def stream(client):
        return [c async for c in await client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, stream=True)]

    chunks, _ = run(stream)
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "Checking."
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    assert [c.index for c in calls] == [0, 1] and all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert _calls(calls) == WANT
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


def test_without_tools_the_text_is_left_alone():
    r, _ = run(lambda c: c.chat.completions.create(model="scripted", messages=ASK))
    assert r.choices[0].message.content == SAID and r.choices[0].finish_reason == "stop"
    r, _ = run(lambda c: c.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice="none"))
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == SAID
