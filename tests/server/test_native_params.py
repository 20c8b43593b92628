"""LightLLM's `parameters` onto SamplingParams."""

import msgspec
import pytest

from lightllm_plugin.server.native import NativeParameters, NativeRequest, to_sampling_params


def _params(**kw):
    return to_sampling_params(NativeParameters(**kw))


def test_lightllm_defaults_are_greedy_with_16_new_tokens():
    p = _params()
    assert p.greedy and p.max_new_tokens == 16 and p.min_new_tokens == 1 and p.n == 1
    assert p.logprobs == 0 and p.skip_special_tokens


def test_do_sample_keeps_the_temperature_and_greedy_ignores_it():
    assert _params(do_sample=True, temperature=0.7).temperature == 0.7
    assert _params(do_sample=False, temperature=0.7).temperature == 0.0


def test_negative_temperature_is_refused_even_when_greedy():
    with pytest.raises(ValueError, match="temperature"):
        _params(temperature=-1.0)


def test_stop_sequences_take_a_string_a_list_or_null():
    assert _params(stop_sequences="x").stop == ["x"]
    assert _params(stop_sequences=["a", "b"]).stop == ["a", "b"]
    assert _params(stop_sequences=None).stop == []


def test_min_new_tokens_default_never_exceeds_max_new_tokens():
    assert _params(max_new_tokens=1).min_new_tokens == 1


def test_unknown_keys_are_ignored_and_nulls_mean_default():
    body = b'{"inputs": "hi", "extra": 1, "parameters": {"top_k": null, "best_of": 1, "max_new_tokens": 4}}'
    req = msgspec.json.decode(body, type=NativeRequest)
    p = to_sampling_params(req.parameters)
    assert req.inputs == "hi" and p.top_k == -1 and p.max_new_tokens == 4


def test_wrong_types_name_the_field():
    with pytest.raises(msgspec.ValidationError, match=r"parameters.max_new_tokens"):
        msgspec.json.decode(b'{"inputs": "hi", "parameters": {"max_new_tokens": "4"}}', type=NativeRequest)
