"""ChatLightLLM's tool path end to end: bind_tools, tool_choice, a conversation holding a tool
call and its result, and with_structured_output, against a real server whose model's template
takes tools (tiny_tools_model). The random weights never answer with a call, so what is checked
is what reached the template, read from the prompt's token count; turning a call in the answer
into AIMessage.tool_calls is test_langchain.test_tool_call_plumbing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("langchain_core")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from tiny_tools_model import WEATHER  # noqa: E402

from lightllm_plugin.adapters.langchain import ChatLightLLM  # noqa: E402

ASK = "What is the weather in Paris?"
# the JSON schema of WEATHER is rendered into the prompt: at least this many more tokens
SCHEMA_TOKENS = len(json.dumps(WEATHER)) // 8


@pytest.fixture(scope="module")
def chat(launch_server, tiny_tools_model):
    server = launch_server("--model_dir", tiny_tools_model)
    return ChatLightLLM(base_url=server.url, temperature=0, max_tokens=3, model_kwargs={"ignore_eos": True})


def prompt_tokens(message: AIMessage) -> int:
    return message.usage_metadata["input_tokens"]


def test_bound_tools_reach_the_template_and_tool_choice_none_keeps_them_out(chat):
    plain = chat.invoke(ASK)
    with_tools = chat.bind_tools([WEATHER]).invoke(ASK)
    assert prompt_tokens(with_tools) > prompt_tokens(plain) + SCHEMA_TOKENS
    assert with_tools.response_metadata["finish_reason"] == "length" and with_tools.usage_metadata["output_tokens"] == 3
    assert prompt_tokens(chat.bind_tools([WEATHER], tool_choice="none").invoke(ASK)) == prompt_tokens(plain)


def test_a_conversation_with_a_tool_call_and_its_result_renders(chat):
    tools = chat.bind_tools([WEATHER])
    asked = tools.invoke(ASK)
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    answered = tools.invoke([HumanMessage(ASK), AIMessage(content="", tool_calls=[call]),
                             ToolMessage('{"temp_c": 21}', tool_call_id="call_1")])
    # the call's JSON and the tool's result are in the prompt
    assert prompt_tokens(answered) > prompt_tokens(asked) + len('<tool_call>{"name": "get_weather"') // 4


def test_with_structured_output_sends_the_schema_as_a_tool(chat):
    class Weather(BaseModel):
        """The weather in a city"""

        city: str

    out = chat.with_structured_output(Weather, method="function_calling", include_raw=True).invoke(ASK)
    assert isinstance(out["raw"], AIMessage) and out["parsing_error"] is None
    assert prompt_tokens(out["raw"]) > prompt_tokens(chat.invoke(ASK)) + SCHEMA_TOKENS // 2
