"""LangChain: the standard langchain-tests suites for ChatLightLLM against one real server
with the default model (SmolLM2-135M), plumbing tests for what that model cannot do, and
the LLM class."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.prompts import PromptTemplate  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from lightllm_plugin.adapters.langchain import ChatLightLLM, LightLLM, chat_chunk, chat_result, message_to_dict  # noqa: E402

SERVER: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def server(default_server):
    """The session's shared default-model server."""
    SERVER["url"] = default_server.url + "/v1"
    return default_server


class ChatLightLLMCapabilities:
    """What both standard suites are told about ChatLightLLM."""

    @property
    def chat_model_class(self):
        return ChatLightLLM

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True


class TestChatLightLLMUnit(ChatLightLLMCapabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {"base_url": "http://127.0.0.1:9/v1", "model": "m", "temperature": 0}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return ({"LIGHTLLM_BASE_URL": "http://127.0.0.1:9/v1", "LIGHTLLM_API_KEY": "sk-env"}, {"model": "m"},
                {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-env"})


@pytest.mark.slow
class TestChatLightLLMIntegration(ChatLightLLMCapabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {"base_url": SERVER["url"], "temperature": 0, "max_tokens": 48}

    # tool calling, forced tool choice, structured output and JSON mode all run against the
    # default model, whose template takes no tools: the server puts them in the system message
    # and holds forced calls and schemas to their grammars
    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True


# What the default model (SmolLM2-135M) cannot do even held to the grammar: the
# grammar fixes the shape, the model still picks the words and whether to call a tool. These
# standard tests are expected to fail (tests/adapters/conftest.py marks them, and runs them only
# with LIGHTLLM_RUN_EXPECTED_FAILURES=1, when an unexpected pass shows as XPASS in the summary).
# Overriding them would trip the suite's own test_no_overrides_DO_NOT_OVERRIDE.
_LOOPS = ("the model loops inside the first string until max_tokens: the answer is valid JSON cut "
          "short, so it lacks `punchline`")
EXPECTED_FAILURES = {
    "TestChatLightLLMIntegration::test_structured_output[pydantic]": _LOOPS,
    "TestChatLightLLMIntegration::test_structured_output_async[pydantic]": _LOOPS,
    "TestChatLightLLMIntegration::test_structured_output_pydantic_2_v1": _LOOPS,
    "TestChatLightLLMIntegration::test_json_mode":
        "json_mode holds the answer to a JSON object, but its keys are the model's: it does not choose "
        "`setup` and `punchline`",
    "TestChatLightLLMIntegration::test_bind_runnables_as_tools":
        "tool_choice auto: the model starts a call, but its `answer_style` string runs on past "
        "max_tokens=48, so no call is complete",
    "TestChatLightLLMIntegration::test_unicode_tool_call_integration":
        "the call is well-formed but not closed within max_tokens=48",
    "TestChatLightLLMIntegration::test_agent_loop[model0]":
        "tool_choice auto: the model answers the weather question in text instead of calling the tool",
    "TestChatLightLLMIntegration::test_agent_loop[model1]":
        "tool_choice auto: the model answers the weather question in text instead of calling the tool",
}


# ---- plumbing the default model cannot show ------------------------------------------------
def test_tool_call_plumbing():
    """An OpenAI response with a tool call becomes AIMessage.tool_calls, and back."""
    body = {"id": "chatcmpl-1", "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                         "tool_calls": [{"id": "call_1", "type": "function",
                                         "function": {"name": "magic", "arguments": '{"x": 3}'}}]}}]}
    message = chat_result(body).generations[0].message
    assert message.tool_calls == [{"name": "magic", "args": {"x": 3}, "id": "call_1", "type": "tool_call"}]
    assert message.response_metadata["finish_reason"] == "tool_calls" and message.usage_metadata["total_tokens"] == 7
    assert message_to_dict(message)["tool_calls"][0]["function"] == {"name": "magic", "arguments": '{"x": 3}'}
    assert message_to_dict(ToolMessage("9", tool_call_id="call_1")) == {"role": "tool", "content": "9", "tool_call_id": "call_1"}
    first = chat_chunk({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "magic", "arguments": '{"x"'}}]}}]})
    last = chat_chunk({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls", "delta": {
        "tool_calls": [{"index": 0, "function": {"arguments": ': 3}'}}]}}]})
    assert (first.message + last.message).tool_calls[0]["args"] == {"x": 3}


def test_bind_tools_sends_openai_tools():
    def magic(x: int) -> int:
        """Apply magic to x."""
        return x

    chat = ChatLightLLM(base_url="http://127.0.0.1:9/v1", model="m")
    bound = chat.bind_tools([magic], tool_choice="any")
    assert bound.kwargs["tools"][0]["function"]["name"] == "magic" and bound.kwargs["tool_choice"] == "required"
    named = {"type": "function", "function": {"name": "magic"}}
    for given, sent in (("magic", named), (named, named), (True, "required"), ("auto", "auto"), ("none", "none")):
        assert chat.bind_tools([magic], tool_choice=given).kwargs["tool_choice"] == sent


# ---- the LLM class ---------------------------------------------------------------------------
@pytest.fixture
def llm():
    return LightLLM(base_url=SERVER["url"], temperature=0, max_tokens=12)


def test_llm_invoke_batch_and_chain(llm):
    assert "Paris" in llm.invoke("The capital of France is")
    outs = llm.batch(["1, 2, 3,", "Hello"])
    assert len(outs) == 2 and all(isinstance(o, str) and o for o in outs)
    assert isinstance((PromptTemplate.from_template("Q: {q}\nA:") | llm).invoke({"q": "What is 2+2?"}), str)


def test_llm_stream_with_callbacks_and_stop(llm):
    class Tokens(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

        tokens: list

    handler = Tokens()
    chunks = list(llm.stream("The capital of France is", config={"callbacks": [handler]}))
    assert len(chunks) > 1 and "".join(chunks) == llm.invoke("The capital of France is")
    assert [t for t in handler.tokens if t] == [c for c in chunks if c]
    full = llm.invoke("The capital of France is")
    assert "." in full
    assert llm.invoke("The capital of France is", stop=["."]) == full[: full.index(".")]


def test_llm_async(llm):
    async def go():
        one = await llm.ainvoke("The capital of France is")
        many = await llm.abatch(["Hello", "Hi"])
        streamed = [c async for c in llm.astream("The capital of France is")]
        return one, many, streamed

    one, many, streamed = asyncio.run(go())
    assert "Paris" in one and len(many) == 2 and "".join(streamed) == one


def test_llm_identity(llm):
    assert llm._llm_type == "lightllm" and llm._identifying_params["max_tokens"] == 12
    ls = llm._get_ls_params()
    assert ls["ls_provider"] == "lightllm" and ls["ls_model_type"] == "llm"


def test_chat_streaming_flag_and_callbacks():
    chat = ChatLightLLM(base_url=SERVER["url"], temperature=0, max_tokens=8, streaming=True)
    seen = []

    class H(BaseCallbackHandler):
        def on_llm_new_token(self, token, **kwargs):
            seen.append(token)

    message = chat.invoke([HumanMessage("What is the capital of France?")], config={"callbacks": [H()]})
    assert isinstance(message, AIMessage) and "".join(seen) == message.content and len(seen) > 1
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.usage_metadata and message.usage_metadata["output_tokens"] > 0
