"""Prompt building and length policy of the tokenizer process."""

import json

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


def test_chat_template_kwargs_are_template_variables_and_cannot_replace_the_template(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    plain = handle(tokenizer, TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=messages), EngineConfig())
    # a variable the template does not read changes nothing
    with_var = handle(tokenizer, TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=messages,
                                                 chat_template_kwargs={"enable_thinking": False}), EngineConfig())
    assert with_var[0].prompt_ids == plain[0].prompt_ids
    # a client's own template (which could loop for minutes in this process) or a rendering option is refused
    for key, value in (("chat_template", "{% for i in range(10**9) %}x{% endfor %}"), ("tokenize", True)):
        req = TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=messages,
                              chat_template_kwargs={key: value})
        result = handle(tokenizer, req, EngineConfig())
        assert isinstance(result, RequestError), key
        assert result.message.startswith("chat_template_kwargs") and key in result.message


def test_an_empty_prompt_is_refused_by_name(tokenizer):
    req = TokenizeRequest(req_ids=[0], params=SamplingParams(), prompt="", field="inputs")
    result = handle(tokenizer, req, EngineConfig())
    assert isinstance(result, RequestError) and "inputs must not be empty" in result.message


def test_too_long_prompt_is_refused_without_truncation_mode():
    with pytest.raises(ValueError, match="max_req_input_len=8"):
        fit_prompt(list(range(9)), SamplingParams(max_new_tokens=1), CONFIG, "inputs")


def test_max_new_tokens_is_lowered_to_the_room_left():
    # LightLLM's rule; LazyLLM sends max_new_tokens=8192 whatever the model's context
    ids, params = fit_prompt(list(range(8)), SamplingParams(max_new_tokens=5, min_new_tokens=5), CONFIG, "inputs")
    assert ids == list(range(8)) and (params.max_new_tokens, params.min_new_tokens) == (4, 4)
    ids, params = fit_prompt([1, 2], SamplingParams(max_new_tokens=8192), CONFIG, "inputs")
    assert ids == [1, 2] and params.max_new_tokens == 10
    kept = SamplingParams(max_new_tokens=3)
    assert fit_prompt([1, 2], kept, CONFIG, "inputs")[1] is kept


def test_head_mode_keeps_the_end_and_tail_mode_keeps_the_start():
    ids = list(range(20))
    head, params = fit_prompt(ids, SamplingParams(max_new_tokens=2), CONFIG.replace(long_truncation_mode="head"), "inputs")
    tail, _ = fit_prompt(ids, SamplingParams(max_new_tokens=2), CONFIG.replace(long_truncation_mode="tail"), "inputs")
    assert head == list(range(12, 20)) and tail == list(range(8)) and params.max_new_tokens == 2
    # the prompt keeps max_req_input_len tokens; the output gets what is left of the total
    short, params = fit_prompt(ids, SamplingParams(max_new_tokens=6), CONFIG.replace(long_truncation_mode="head"), "inputs")
    assert short == list(range(12, 20)) and params.max_new_tokens == 4


def test_handle_sends_the_lowered_max_new_tokens(tokenizer):
    req = TokenizeRequest(req_ids=[0, 1], params=SamplingParams(n=2, max_new_tokens=8192), prompt="Hi")
    adds = handle(tokenizer, req, CONFIG)
    assert [a.params.max_new_tokens for a in adds] == [12 - len(adds[0].prompt_ids)] * 2


def test_n_samples_become_n_requests_with_distinct_seeds():
    req = TokenizeRequest(req_ids=[5, 6, 7], params=SamplingParams(n=3, seed=10, temperature=1.0), prompt="x")
    adds = expand_samples(req, [1, 2])
    assert [a.req_id for a in adds] == [5, 6, 7]
    assert [a.params.seed for a in adds] == [10, 11, 12]
    assert all(isinstance(a, AddRequest) and a.params.n == 1 and a.prompt_ids == [1, 2] for a in adds)
    unseeded = expand_samples(TokenizeRequest(req_ids=[1, 2], params=SamplingParams(n=2), prompt="x"), [1])
    assert [a.params.seed for a in unseeded] == [None, None]


def test_a_template_without_tools_gets_them_in_the_system_message_and_auto_gets_its_grammar(tokenizer):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find a word",
                                               "parameters": {"type": "object", "properties": {"w": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Hi"}]
    [add] = handle(tokenizer, TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=messages, tools=tools),
                   EngineConfig())
    prompt = tokenizer.decode(add.prompt_ids)
    assert "lookup" in prompt and "Find a word" in prompt and '{"w": {"type": "string"}}' in prompt
    assert "<tool_call>" in prompt and prompt.index("lookup") < prompt.index("Hi")  # in the system turn, first
    tag = json.loads(add.params.structured_outputs.structural_tag)  # tool_choice auto: text or calls
    assert tag["format"]["type"] == "triggered_tags" and tag["format"]["triggers"] == ["<tool_call>"]
    # a request that holds its own constraint (a forced call) keeps it
    forced = SamplingParams(structured_outputs={"regex": "a"})
    [add] = handle(tokenizer, TokenizeRequest(req_ids=[0], params=forced, messages=messages, tools=tools),
                   EngineConfig())
    assert add.params.structured_outputs.regex == "a"


def test_openai_style_requests_are_refused_instead_of_shortened():
    with pytest.raises(ValueError, match=r"^max_new_tokens \(8192\) \+ inputs \(2 tokens\) exceeds max_req_total_len"):
        fit_prompt([1, 2], SamplingParams(max_new_tokens=8192), CONFIG, "inputs", lower_max_new_tokens=False)
