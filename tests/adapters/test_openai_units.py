"""The OpenAI adapter's pure parts: the tool-call parser and the request translation."""

import json

import pytest

from lightllm_plugin.adapters.openai.protocol import ApiError, invalid
from lightllm_plugin.adapters.openai.serving_chat import chat_messages, check_response_format
from lightllm_plugin.adapters.openai.serving_completion import completion_prompts
from lightllm_plugin.adapters.openai.structured import response_format_constraint
from lightllm_plugin.adapters.openai.tool_parsers import parse_tool_calls
from lightllm_plugin.adapters.openai.tool_parsers.hermes import HermesToolParser as ToolCallParser

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def _function(call):
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_one_complete_call():
    content, calls = parse_tool_calls(WEATHER)
    assert content is None
    assert [_function(c) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"})]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


def test_several_calls_with_text_before_them():
    content, calls = parse_tool_calls("Let me look that up.\n" + WEATHER + "\n" + TIME + "\n")
    assert content == "Let me look that up."
    assert [_function(c)[0] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n{not json}\n</tool_call>",  # malformed JSON
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>\n{"name": "get_time", "arguments": {}',  # never closed (cut at max_tokens)
        "Just an answer, no calls.\n\n",
        "a <tool_ partial tag at the end <tool_",
    ],
)
def test_text_that_is_not_a_valid_call_stays_text_unchanged(text):
    assert parse_tool_calls(text) == (text, [])


def test_arguments_as_a_string_pass_through_and_parameters_is_read_as_arguments():
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
                                '<tool_call>{"name": "g", "parameters": {"y": 2}}</tool_call>')
    assert [_function(c) for c in calls] == [("f", {"x": 1}), ("g", {"y": 2})]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_in_pieces_it_gives_what_the_whole_text_gives(size):
    text = "Sure.  \n" + WEATHER + "\n<tool_call>{bad}</tool_call> then " + TIME + " \n"
    parser, content, names = ToolCallParser(), "", []
    for start in range(0, len(text), size):
        piece_content, calls = parser.feed(text[start:start + size])
        content += piece_content
        names += [c["function"]["name"] for c in calls]
    content += parser.finish()
    whole_content, whole_calls = parse_tool_calls(text)
    assert (content, names) == (whole_content, [c["function"]["name"] for c in whole_calls])
    assert content == "Sure.\n<tool_call>{bad}</tool_call> then"


def test_completion_prompts_in_every_form():
    assert completion_prompts("hi") == [{"prompt": "hi", "field": "prompt"}]
    assert [p["prompt"] for p in completion_prompts(["a", "b"])] == ["a", "b"]
    assert completion_prompts([1, 2, 3]) == [{"prompt_ids": [1, 2, 3], "field": "prompt"}]
    assert [p["prompt_ids"] for p in completion_prompts([[1], [2, 3]])] == [[1], [2, 3]]
    for bad in ([], [1, "a"], [[]], 5, None, [True]):
        with pytest.raises(ApiError) as info:
            completion_prompts(bad)
        assert info.value.param == "prompt" and info.value.status == 400


def test_chat_messages_are_put_in_the_shape_templates_expect():
    messages = chat_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[1]["content"] == "ab" and messages[2]["content"] == ""
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    for bad in ([], [{"content": "x"}], [{"role": "user"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(ApiError) as info:
            chat_messages(bad)
        assert info.value.param == "messages"


def test_response_format():
    user = [{"role": "user", "content": "Answer in JSON."}]
    check_response_format({"type": "json_object"}, user)
    check_response_format({"type": "text"}, [{"role": "user", "content": "hi"}])
    with pytest.raises(ApiError, match="json"):
        check_response_format({"type": "json_object"}, [{"role": "user", "content": "hi"}])
    for bad in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": []}}, {"type": "xml"}):
        with pytest.raises(ApiError) as info:
            response_format_constraint(bad)
        assert info.value.param == "response_format"
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    spec = response_format_constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert json.loads(spec.json) == schema and spec.field == "response_format.json_schema.schema"


def test_errors_name_the_field_the_client_sent():
    error = invalid("max_new_tokens must be an integer >= 1, got 0", renames={"max_new_tokens": "max_completion_tokens"})
    assert (error.param, error.message) == ("max_completion_tokens", "max_completion_tokens must be an integer >= 1, got 0")
    assert invalid("prompt[2] is 600 tokens long").param == "prompt"
    assert invalid("max_tokens: Expected `int`, got `str`", 422).body() == {
        "error": {"message": "max_tokens: Expected `int`, got `str`", "type": "invalid_request_error",
                  "param": "max_tokens", "code": None}
    }


def test_a_message_that_names_no_request_field_has_a_null_param():
    for message in ("Expected `object`, got `array`", "the body is not valid JSON: truncated",
                    "a number in the request is out of range"):
        assert invalid(message, 422 if message.startswith("E") else 400).param is None
    assert invalid("stream_options.include_usage: Expected `bool | null`, got `str`", 422).param == \
        "stream_options.include_usage"
    assert invalid("messages[0].role must be one of system, user", 400).param == "messages.role"


class _NoEngine:
    """The routes refuse these bodies before they reach the engine."""

    def __init__(self):
        from lightllm_plugin.server.metrics import ServerMetrics

        self.metrics = ServerMetrics()


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/chat/completions", {}, "model"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/completions", {"model": None, "prompt": "hi"}, "model"),
        ("/v1/chat/completions", {"model": 5, "messages": []}, "model"),
        ("/v1/chat/completions", {"model": "m", "messages": "hi"}, "messages"),
        ("/v1/completions", [], None),
    ],
)
def test_a_missing_or_mistyped_required_field_is_a_4xx_in_openais_shape_naming_it(path, body, param):
    from fastapi.testclient import TestClient

    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.server.api import create_app

    response = TestClient(create_app(_NoEngine(), EngineConfig())).post(path, json=body)
    assert response.status_code in (400, 422)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if param is not None:
        assert param in error["message"]
