"""Prompt building and length policy of the tokenizer process."""

import pytest

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.protocol import AddRequest, RequestError, TokenizeRequest
from lightllm_plugin.server.tokenizer import expand_samples, fit_prompt, handle


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm_plugin.models.tokenizer import load_tokenizer

    return load_tokenizer(None)


CONFIG = EngineConfig(max_req_input_len=8, max_req_total_len=12)


def test_messages_get_the_chat_template(tokenizer):
    req = TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=[{"role": "user", "content": "Hi"}])
    (add,) = handle(tokenizer, req, EngineConfig())
    text = tokenizer.decode(add.prompt_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text


def test_a_bad_conversation_names_messages(tokenizer):
    req = TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=[{"role": "user"}])
    result = handle(tokenizer, req, EngineConfig())
    assert isinstance(result, RequestError) and result.message.startswith("messages")


def test_an_empty_prompt_is_refused_by_name(tokenizer):
    req = TokenizeRequest(req_ids=[0], params=SamplingParams(), prompt="", field="inputs")
    result = handle(tokenizer, req, EngineConfig())
    assert isinstance(result, RequestError) and "inputs must not be empty" in result.message


def test_too_long_prompt_is_refused_without_truncation_mode():
    with pytest.raises(ValueError, match="max_req_input_len=8"):
        fit_prompt(list(range(9)), SamplingParams(max_new_tokens=1), CONFIG, "inputs")


def test_prompt_plus_output_over_the_total_is_refused():
    with pytest.raises(ValueError, match="max_req_total_len=12"):
        fit_prompt(list(range(8)), SamplingParams(max_new_tokens=5), CONFIG, "inputs")


def test_head_mode_keeps_the_end_and_tail_mode_keeps_the_start():
    ids = list(range(20))
    head = fit_prompt(ids, SamplingParams(max_new_tokens=2), CONFIG.replace(long_truncation_mode="head"), "inputs")
    tail = fit_prompt(ids, SamplingParams(max_new_tokens=2), CONFIG.replace(long_truncation_mode="tail"), "inputs")
    assert head == list(range(12, 20)) and tail == list(range(8))
    # the cut also leaves room for the output
    short = fit_prompt(ids, SamplingParams(max_new_tokens=6), CONFIG.replace(long_truncation_mode="head"), "inputs")
    assert short == list(range(14, 20))


def test_n_samples_become_n_requests_with_distinct_seeds():
    req = TokenizeRequest(req_ids=[5, 6, 7], params=SamplingParams(n=3, seed=10, temperature=1.0), prompt="x")
    adds = expand_samples(req, [1, 2])
    assert [a.req_id for a in adds] == [5, 6, 7]
    assert [a.params.seed for a in adds] == [10, 11, 12]
    assert all(isinstance(a, AddRequest) and a.params.n == 1 and a.prompt_ids == [1, 2] for a in adds)
    unseeded = expand_samples(TokenizeRequest(req_ids=[1, 2], params=SamplingParams(n=2), prompt="x"), [1])
    assert [a.params.seed for a in unseeded] == [None, None]


def test_tools_are_refused_by_a_template_that_would_drop_them(tokenizer):
    tools = [{"type": "function", "function": {"name": "f"}}]
    req = TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=[{"role": "user", "content": "Hi"}], tools=tools)
    result = handle(tokenizer, req, EngineConfig())
    assert isinstance(result, RequestError) and result.message.startswith("tools") and result.status == 400
