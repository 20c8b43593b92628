"""Tools through the SDK, with a tiny random-weight Qwen2 model whose chat template takes
them (structure only: random weights say nothing sensible), and the API key. The key comes
from LIGHTLLM_API_KEY here; tests/server/test_cli.py covers the --api-key flag."""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
from tiny_tools_model import WEATHER

KEY = "sk-test-4f1c"
NAME = "tiny-qwen-tools"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(launch_server, tiny_tools_model):
    old = os.environ.get("LIGHTLLM_API_KEY")
    os.environ["LIGHTLLM_API_KEY"] = KEY
    try:
        return launch_server("--model_dir", tiny_tools_model, "--served-model-name", NAME)
    finally:
        if old is None:
            del os.environ["LIGHTLLM_API_KEY"]
        else:
            os.environ["LIGHTLLM_API_KEY"] = old


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def test_a_wrong_or_missing_key_is_refused_and_only_the_probes_stay_open(server):
    for key in ("sk-wrong", KEY + "x", KEY[:-1]):
        with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                bad.models.list()
            assert info.value.code == "invalid_api_key"
    missing = httpx.get(server.url + "/v1/models", timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(server.url + "/generate", json={"inputs": "hi"}, timeout=30).status_code == 401
    for path in ("/health", "/healthz"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 401
    with_key = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert with_key.status_code == 200 and "# TYPE lightllm_" in with_key.text


def test_every_route_but_the_probes_needs_the_key(server):
    """Every operation of the OpenAPI document, and the document itself, answers 401 without the key."""
    doc = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    operations = [(method.upper(), path) for path, item in doc["paths"].items() for method in item]
    assert len(operations) >= 8, operations  # the native routes, /v1 and /metrics at least
    for method, path in operations + [("GET", "/openapi.json"), ("GET", "/docs")]:
        path = path.replace("{model}", NAME).replace("{model_id}", NAME)
        status = httpx.request(method, server.url + path, timeout=30).status_code
        assert status == (200 if path in ("/health", "/healthz") else 401), (method, path, status)


def test_the_served_model_name_is_the_one_given(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny-qwen2", messages=ASK, max_tokens=2)


def test_tools_reach_the_template_and_the_answer_has_the_chat_shape(client):
    plain = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=6, temperature=0)
    with_tools = client.chat.completions.create(
        model=NAME, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )
    # the template rendered the tool's JSON schema into the prompt
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + len(json.dumps(WEATHER)) // 8
    assert with_tools.usage.completion_tokens == 6
    (choice,) = with_tools.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    # tool_choice none: the template is not given the tools
    none = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=2)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


def test_streaming_with_tools_gives_what_the_whole_answer_gives(client):
    kwargs = dict(model=NAME, messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_a_conversation_with_a_tool_call_and_its_result_renders(client):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=ASK, tools=[{"type": "function"}], max_tokens=2)
    assert info.value.param == "tools"
