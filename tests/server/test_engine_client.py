"""AsyncEngineClient's bookkeeping when a client leaves, without sockets or a model."""

from __future__ import annotations

import asyncio

from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.engine_client import AsyncEngineClient
from lightllm_plugin.server.protocol import AbortRequest, Addresses, TokenOutput, decoder_for


class _Sink:
    def __init__(self):
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)


class _AsyncSink(_Sink):
    async def send(self, frame: bytes) -> None:
        self.frames.append(frame)


def _out(req_id: int, n: int, finish: str | None) -> TokenOutput:
    return TokenOutput(req_id=req_id, token_id=5, text="x", logprob=None, top_logprobs=None, special=False,
                       finish_reason=finish, output_len=n, prompt_len=3)


def _finished(client: AsyncEngineClient) -> dict[str, float]:
    lines = [l for l in client.metrics.render().splitlines() if l.startswith("lightllm_requests_finished_total{")]
    return {l.split('"')[1]: float(l.rsplit(" ", 1)[1]) for l in lines}


def _run(tmp_path, leave_after_last_token_arrived: bool):
    async def scenario():
        client = AsyncEngineClient(Addresses(str(tmp_path)))
        client._to_tokenizer, client._to_router = _AsyncSink(), _Sink()
        outputs = client.generate(SamplingParams(max_new_tokens=2), prompt="hi")
        first = asyncio.ensure_future(anext(outputs))
        await asyncio.sleep(0)  # the request is sent and waits for its first token
        client._deliver(_out(0, 1, None), 0.0)
        assert (await first)[1].output_len == 1
        if leave_after_last_token_arrived:
            client._deliver(_out(0, 2, "length"), 0.0)  # queued, never read: the client is gone
        await outputs.aclose()
        aborts = [decoder_for(AbortRequest).decode(f) for f in client._to_router.frames]
        return aborts, _finished(client)

    return asyncio.run(scenario())


def test_a_client_leaving_mid_stream_aborts_its_request_once(tmp_path):
    aborts, finished = _run(tmp_path, leave_after_last_token_arrived=False)
    assert aborts == [AbortRequest(req_ids=[0])]
    assert finished == {"abort": 1}


def test_a_client_leaving_after_its_last_token_arrived_is_counted_once_and_not_aborted(tmp_path):
    # the engine has already ended the request: an abort would count it twice (finished and
    # aborted) and leave a stale early-abort entry in the router
    aborts, finished = _run(tmp_path, leave_after_last_token_arrived=True)
    assert aborts == []
    assert finished == {"length": 1}
