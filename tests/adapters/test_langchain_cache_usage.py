"""Prefix-cache reads reach LangChain's usage_metadata as input_token_details.cache_read, from
our ChatLightLLM and from langchain-openai's ChatOpenAI alike, against the shared default server.
Each test takes a fresh cache_salt, so nothing earlier tests cached is under it."""

from __future__ import annotations

import uuid

import pytest
from langchain_core.messages import HumanMessage
from lightllm_plugin.adapters.langchain import ChatLightLLM, chat_chunk, chat_result


@pytest.fixture(scope="module")
def server(default_server):
    return default_server


def question() -> list[HumanMessage]:
    return [HumanMessage(f"[{uuid.uuid4().hex}] Name a fruit.")]


def cache_read(message) -> int:
    return message.usage_metadata["input_token_details"]["cache_read"]


def test_cached_tokens_map_to_cache_read_in_whole_and_streamed_answers():
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11, "prompt_tokens_details": {"cached_tokens": 8}}
    body = {"id": "chatcmpl-1", "model": "m", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
    message = chat_result(body).generations[0].message
    assert message.usage_metadata == {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11,
                                      "input_token_details": {"cache_read": 8}}
    assert cache_read(chat_chunk({"id": "c", "choices": [], "usage": usage}).message) == 8
    # a server that reports no details: no details invented
    del usage["prompt_tokens_details"]
    assert "input_token_details" not in chat_result(body).generations[0].message.usage_metadata


@pytest.mark.parametrize("streaming", [False, True])
def test_chat_lightllm_reports_the_cache_read_of_a_repeated_prompt(server, streaming):
    chat = ChatLightLLM(base_url=server.url + "/v1", temperature=0, max_tokens=4, streaming=streaming,
                        model_kwargs={"cache_salt": uuid.uuid4().hex})
    messages = question()
    first, second = chat.invoke(messages), chat.invoke(messages)
    assert cache_read(first) == 0
    assert cache_read(second) == second.usage_metadata["input_tokens"] - 1


def test_langchain_openai_reads_the_same_cached_tokens(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    salt = uuid.uuid4().hex
    ours = ChatLightLLM(base_url=server.url + "/v1", temperature=0, max_tokens=4, model_kwargs={"cache_salt": salt})
    theirs = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="x", model=ours._model_name(),
                                         temperature=0, max_tokens=4, max_retries=0,
                                         extra_body={"cache_salt": salt})
    messages = question()
    first = theirs.invoke(messages)
    assert cache_read(first) == 0
    again = theirs.invoke(messages)
    assert cache_read(again) == again.usage_metadata["input_tokens"] - 1
    mine = ours.invoke(messages).usage_metadata  # the same prompt, the same counts
    assert {k: again.usage_metadata[k] for k in mine} == mine  # theirs adds an empty output_token_details
