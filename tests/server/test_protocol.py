"""Messages survive msgpack, and a socket's decoder accepts only its own union."""

import msgspec
import pytest

from lightllm_plugin.engine.outputs import TokenEvent
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.protocol import (
    AbortRequest,
    AddRequest,
    ApiInbox,
    DetokenizerInbox,
    EngineStats,
    OutputBatch,
    RouterInbox,
    TokenBatch,
    TokenOutput,
    decoder_for,
    encoder,
)


def test_round_trip_per_socket():
    add = AddRequest(req_id=3, prompt_ids=[1, 2], params=SamplingParams(temperature=0.0, stop=["x"], seed=4))
    assert decoder_for(RouterInbox).decode(encoder.encode(add)) == add
    assert decoder_for(RouterInbox).decode(encoder.encode(AbortRequest(req_ids=[1]))) == AbortRequest(req_ids=[1])
    batch = TokenBatch(events=[TokenEvent(1, 2, -0.1, [(3, -1.0)], None, 1, 5)])
    assert decoder_for(DetokenizerInbox).decode(encoder.encode(batch)) == batch
    out = OutputBatch(outputs=[TokenOutput(1, 2, "é", None, None, False, "stop", 1, 5)])
    assert decoder_for(ApiInbox).decode(encoder.encode(out)) == out
    stats = EngineStats(1, 2, 3, 4)
    assert decoder_for(ApiInbox).decode(encoder.encode(stats)) == stats


def test_a_message_for_another_socket_is_refused():
    with pytest.raises(msgspec.ValidationError):
        decoder_for(RouterInbox).decode(encoder.encode(EngineStats(1, 2, 3, 4)))


def test_invalid_sampling_params_are_refused_on_decode():
    raw = msgspec.msgpack.encode({"type": "AddRequest", "req_id": 1, "prompt_ids": [1], "params": {"temperature": -1.0}})
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        decoder_for(RouterInbox).decode(raw)
