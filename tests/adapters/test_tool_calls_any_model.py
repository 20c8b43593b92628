"""Tool calls on a model whose chat template takes no tools (the default model), through the
official `openai` SDK on the shared server: the tools go into the system message, a forced call
("required" or a named tool) is held to a well-formed call whose arguments validate against the
tool's schema (pydantic), whole and streamed, and "auto" gives text or such a call."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pydantic
import pytest

from lightllm_plugin.tool_calls import tools_system_prompt, with_tools_in_system_message


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


class Clock(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    timezone: str = pydantic.Field(max_length=20)


SCHEMAS = {"get_weather": Weather, "get_time": Clock}
# written out (pydantic's own schemas add titles: a longer prompt for the same checks)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone", "parameters": {
        "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
        "required": ["timezone"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def client(default_server):
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _valid_call(call) -> str:
    assert call.type == "function" and call.id
    SCHEMAS[call.function.name].model_validate_json(call.function.arguments)
    return call.function.name


def test_the_system_message_lists_each_tool_and_the_format():
    prompt = tools_system_prompt(TOOLS)
    for tool in TOOLS:
        assert json.dumps(tool["function"]["parameters"]) in prompt and tool["function"]["description"] in prompt
    assert '<tool_call>\n{"name": <tool name>, "arguments": <arguments as a JSON object>}\n</tool_call>' in prompt
    merged = with_tools_in_system_message([{"role": "system", "content": "Be brief."}, *ASK], TOOLS)
    assert len(merged) == 2 and merged[0]["content"].startswith("Be brief.\n\n") and merged[1] == ASK[0]


def test_required_and_named_calls_are_well_formed_whole_and_streamed(client, model):
    def ask(job):
        choice, stream = job
        kwargs = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=MAX_TOKENS, temperature=0)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0]
        calls, finish = {}, None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return calls, finish

    named = {"type": "function", "function": {"name": "get_time"}}
    jobs = [("required", False), (named, False), ("required", True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        required, forced, streamed = pool.map(ask, jobs)
    for choice in (required, forced):
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    assert _valid_call(required.message.tool_calls[0]) in SCHEMAS
    assert _valid_call(forced.message.tool_calls[0]) == "get_time"
    calls, finish = streamed
    assert finish == "tool_calls" and len(calls) == 1 and calls[0]["id"]
    # greedy: the stream's call is the whole answer's call
    assert (calls[0]["name"], calls[0]["arguments"]) == (required.message.tool_calls[0].function.name,
                                                         required.message.tool_calls[0].function.arguments)


def test_auto_gives_text_or_a_well_formed_call(client, model):
    prompts = [ASK, [{"role": "user", "content": "Say hello."}]]

    def ask(messages):
        return client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=24,
                                              temperature=0).choices[0]

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, prompts))
    for choice in answers:
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                _valid_call(call)
        else:
            assert "<tool_call>" not in (choice.message.content or "")


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # nothing to call
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"},
      "messages": [{"role": "user", "content": "json please"}]}, "tool_choice"),
])
def test_bad_tool_choices_are_400s(client, model, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": model, "messages": ASK, "max_tokens": 4, **fields})
    assert info.value.param == param
