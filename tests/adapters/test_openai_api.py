"""The official `openai` package, sync and async, against a real server with the default model."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a long poem about the sea."}]


@pytest.fixture(scope="module")
def server(default_server):
    return default_server  # the session's shared default-model server: counters are read as deltas


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm_plugin.models.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def answer(client, model):
    """The greedy answer to the question, with the logprobs of each token."""
    return client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=20, logprobs=True, top_logprobs=3
    )


def _check_head(response, obj, prefix, model):
    assert response.id.startswith(prefix) and response.object == obj and response.model == model
    assert isinstance(response.created, int) and response.system_fingerprint.startswith("fp_")


def test_models_list_the_served_model_with_its_length_limit(client, model):
    (card,) = client.models.list().data
    assert card.id == model == "SmolLM2-135M-Instruct.Q4_1"  # the GGUF file's name
    assert card.object == "model" and card.owned_by == "lightllm-plugin"
    assert card.model_extra["max_model_len"] == 512  # live_server's --max_req_total_len
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_answers_paris_and_counts_tokens_like_the_tokenizer(answer, model, tokenizer):
    _check_head(answer, "chat.completion", "chatcmpl-", model)
    (choice,) = answer.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in choice.message.content and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    prompt_text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    tokens = choice.logprobs.content
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(tokens)  # the eos token included
    assert answer.usage.total_tokens == len(prompt_ids) + len(tokens)
    # the last token is the end of turn, which skip_special_tokens leaves out of the text
    assert "".join(t.token for t in tokens[:-1]) == choice.message.content
    assert tokens[-1].token == tokenizer.eos_token


def test_logprobs_are_real_log_probabilities_of_the_greedy_choice(answer):
    for token in answer.choices[0].logprobs.content:
        top = token.top_logprobs
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token == token.token and math.isclose(top[0].logprob, token.logprob)  # greedy: the argmax
        assert token.logprob <= 0 and sum(math.exp(t.logprob) for t in top) <= 1 + 1e-5
        assert bytes(token.bytes).decode() == token.token


def test_streamed_chunks_join_to_the_same_text_and_end_with_one_usage_chunk(client, model, answer):
    chunks = list(client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}
    ))
    *ordinary, last = chunks
    # the same counts, but the repeated question is read from the prefix cache, all but its last token
    uncached = {"prompt_tokens_details": None}
    assert last.choices == [] and last.usage.model_copy(update=uncached) == answer.usage.model_copy(update=uncached)
    assert last.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 1
    assert all(c.usage is None for c in ordinary) and len({c.id for c in chunks}) == 1
    for c in chunks:
        _check_head(c, "chat.completion.chunk", "chatcmpl-", model)
    assert ordinary[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in ordinary] == [None] * (len(ordinary) - 1) + ["stop"]
    assert "".join(c.choices[0].delta.content or "" for c in ordinary) == answer.choices[0].message.content
    without_usage = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20, stream=True))
    assert all(c.choices for c in without_usage)


def test_stop_cuts_before_the_stop_string(client, model, answer):
    text = answer.choices[0].message.content
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20, stop=[" Paris", "zzz"])
    assert r.choices[0].message.content == text[: text.index(" Paris")]
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens_ends_with_length_after_exactly_that_many_tokens(client, model):
    for extra in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = client.chat.completions.create(model=model, messages=POEM, temperature=0, **extra)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_async_client_n_samples_and_seeds(server, model):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
            def ask(seed):
                return client.chat.completions.create(
                    model=model, messages=POEM, temperature=1.0, max_tokens=8, n=3, seed=seed
                )
            return await asyncio.gather(ask(1), ask(1), ask(2))

    first, again, other = asyncio.run(run())
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # the same seed, the same samples
    assert texts != [c.message.content for c in other.choices]
    assert len(set(texts)) > 1  # sample i draws with seed + i
    assert first.usage.completion_tokens == 3 * 8 or any(c.finish_reason == "stop" for c in first.choices)
    assert first.usage.prompt_tokens == other.usage.prompt_tokens  # the prompt is counted once


def test_completions_keep_the_order_of_a_list_of_prompts(client, model):
    prompts = ["The sky is", "One, two, three,", "Paris is the capital of", "def add(a, b):"]
    batch = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    _check_head(batch, "text_completion", "cmpl-", model)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    for prompt, choice in zip(prompts, batch.choices):
        alone = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        assert choice.text == alone.choices[0].text and choice.finish_reason == "length"
    assert batch.usage.completion_tokens == 16


def test_completions_echo_logprobs_token_ids_and_streaming(client, model, tokenizer):
    ids = tokenizer.encode("The sky is")
    r = client.completions.create(model=model, prompt=ids, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert all(len(top) == 2 and top[t] == p for top, t, p in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    assert r.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model=model, prompt="The sky is", max_tokens=3, temperature=0, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "The sky is" + r.choices[0].text
    chunks = list(client.completions.create(
        model=model, prompt="The sky is", max_tokens=3, temperature=0, stream=True, echo=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == echoed.choices[0].text
    assert chunks[-1].usage == echoed.usage


def test_one_refused_prompt_refuses_the_list_and_frees_the_others(client, model, server):
    from support.live_server import slots_drain

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=["Hello", "word " * 400], max_tokens=50, extra_body={"ignore_eos": True})
    assert info.value.param == "prompt" and "prompt[1]" in info.value.message
    assert slots_drain(server), "the list's other request kept its slots"


BAD = [
    # (request fields, the exception class, the param the error names)
    ({"temperature": -1}, openai.BadRequestError, "temperature"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"top_logprobs": 30, "logprobs": True}, openai.BadRequestError, "top_logprobs"),
    ({"max_tokens": 600}, openai.BadRequestError, "max_tokens"),
    ({"n": 0}, openai.BadRequestError, "n"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [{"type": "function", "function": {"name": "f"}}]},
     openai.BadRequestError, "tool_choice"),  # g is not among the tools
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, openai.BadRequestError, "tools"),
    ({"response_format": {"type": "json_object"}}, openai.BadRequestError, "messages"),  # the prompt never says JSON
    ({"extra_body": {"max_tokens": "5"}}, openai.UnprocessableEntityError, "max_tokens"),
    ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
]


@pytest.mark.parametrize("fields,error,param", BAD, ids=[p for _, _, p in BAD])
def test_bad_requests_raise_the_sdk_exception_naming_the_field(client, model, fields, error, param):
    with pytest.raises(error) as info:
        client.chat.completions.create(**{"model": model, "messages": [{"role": "user", "content": "hi"}], **fields})
    assert info.value.param == param and param in info.value.message
    assert info.value.type == "invalid_request_error"


def test_json_object_is_accepted_and_the_native_api_and_health_still_answer(client, model, server):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Reply in JSON."}], max_tokens=3,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    native = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert native.status_code == 200
