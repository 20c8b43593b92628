import msgspec
import pytest

from lightllm_plugin.sampling_params import SamplingParams


def test_vllm_names_map_onto_lightllm_names():
    p = SamplingParams(max_tokens=40, min_tokens=3, stop="###")
    assert (p.max_new_tokens, p.min_new_tokens, p.stop) == (40, 3, ["###"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("min_p", 1.5),
     ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
     ("max_new_tokens", 0), ("n", 0), ("logprobs", 21)],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_above_max_rejected():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)


def test_round_trips_through_msgpack_with_validation():
    p = SamplingParams(temperature=0.3, stop=["a"], seed=9, logprobs=2)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    bad = msgspec.msgpack.encode({"temperature": -1.0})
    with pytest.raises((ValueError, msgspec.ValidationError)):
        msgspec.msgpack.decode(bad, type=SamplingParams)


def test_each_sample_gets_the_seed_plus_its_index_wrapped_into_64_bits():
    top = SamplingParams(n=3, seed=2**63 - 1)
    assert [top.for_sample(i).seed for i in range(3)] == [2**63 - 1, -(2**63), -(2**63) + 1]
    assert all(top.for_sample(i).n == 1 for i in range(3))
    assert SamplingParams(n=2).for_sample(1).seed is None
