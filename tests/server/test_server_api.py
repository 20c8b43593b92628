"""LightLLM's native API against a real server running the default model."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from support.live_server import metric, metric_total, slots_drain, sse_events

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def server(default_server):
    return default_server  # the session's shared default-model server: counters are read as deltas


def post(server, path, body, timeout=TIMEOUT) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=timeout)


def stream(server, body) -> list[dict]:
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def greedy(max_new_tokens, **extra):
    return {"max_new_tokens": max_new_tokens, "do_sample": False, **extra}


def test_health(server):
    for path in ("/health", "/healthz"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200


def test_generate_answers_paris_via_messages(server, offline):
    from lightllm_plugin.sampling_params import SamplingParams

    r = post(server, "/generate", {"messages": QUESTION, "parameters": greedy(20)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"generated_text", "count_output_tokens", "finish_reason", "prompt_tokens"}
    assert isinstance(body["generated_text"], list) and len(body["generated_text"]) == 1
    assert "Paris" in body["generated_text"][0]
    # the counts are the offline engine's for the same chat, exactly
    (want,) = offline.chat([QUESTION], SamplingParams(temperature=0.0, max_new_tokens=20), use_tqdm=False)
    assert body["prompt_tokens"] == len(want.prompt_token_ids)
    assert body["count_output_tokens"] == len(want.outputs[0].token_ids)
    assert body["finish_reason"] == want.outputs[0].finish_reason


@pytest.fixture(scope="module")
def reference_answer(server, chat_prompt) -> str:
    """/generate's greedy answer to the templated question."""
    r = post(server, "/generate", {"inputs": chat_prompt, "parameters": greedy(20)})
    assert r.status_code == 200, r.text
    return r.json()["generated_text"][0]


def test_generate_stream_answers_paris_with_lightllm_framing(server, chat_prompt, reference_answer):
    events = stream(server, {"inputs": chat_prompt, "parameters": greedy(20)})
    assert events and all(set(e) >= {"token", "generated_text", "finished", "finish_reason"} for e in events)
    assert all(set(e["token"]) >= {"id", "text", "logprob", "special", "count_output_tokens", "prompt_tokens"} for e in events)
    assert [e["finished"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["finish_reason"] in ("stop", "length")
    assert [e["token"]["count_output_tokens"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events)
    text = "".join(e["token"]["text"] for e in events)
    assert "Paris" in text
    assert text == reference_answer  # streaming or not, the same text


@pytest.fixture(scope="module")
def chat_prompt(offline):
    """The question with the chat template applied on the client side."""
    return offline.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def offline():
    from lightllm_plugin.llm import LLM

    return LLM(max_total_token_num=2048, max_req_total_len=512, max_req_input_len=256, progress=False)


def test_greedy_output_equals_the_offline_engine(server, offline, chat_prompt):
    from lightllm_plugin.sampling_params import SamplingParams

    want = offline.generate([chat_prompt], SamplingParams(temperature=0.0, max_new_tokens=24), use_tqdm=False)[0].outputs[0]
    body = {"inputs": chat_prompt, "parameters": greedy(24, min_new_tokens=0, return_details=True)}
    got = post(server, "/generate", body).json()
    assert got["generated_text"] == [want.text]
    assert [t["id"] for t in got["tokens"]] == want.token_ids
    assert got["finish_reason"] == want.finish_reason


def test_sixteen_concurrent_streams_finish_with_the_right_reasons(server):
    async def one(client, i):
        # half run to their limit, half may end at eos first
        params = greedy(3 + i % 4, ignore_eos=i % 2 == 0)
        body = {"inputs": f"Count from {i} to {i + 20}:", "parameters": params}
        async with client.stream("POST", server.url + "/generate_stream", json=body) as r:
            assert r.status_code == 200
            events = sse_events([line async for line in r.aiter_lines()])
        return params, events

    async def run_all():
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(run_all())
    assert len(results) == 16
    for params, events in results:
        last = events[-1]
        assert last["finished"] and sum(e["finished"] for e in events) == 1
        n = last["token"]["count_output_tokens"]
        assert n == len(events) <= params["max_new_tokens"]
        if params["ignore_eos"]:
            assert (last["finish_reason"], n) == ("length", params["max_new_tokens"])
        elif n < params["max_new_tokens"]:
            assert last["finish_reason"] == "stop" and last["token"]["special"]
        else:
            assert last["finish_reason"] in ("stop", "length")


def test_max_new_tokens_is_honoured(server):
    for n in (1, 5):
        body = post(server, "/generate", {"inputs": "Once upon a time", "parameters": greedy(n, ignore_eos=True, return_details=True)}).json()
        assert body["count_output_tokens"] == n and len(body["tokens"]) == n
        assert body["finish_reason"] == "length"


def test_stop_sequence_cuts_exactly_before_it(server, chat_prompt, reference_answer):
    full = reference_answer
    # one stop inside a token, one spanning two tokens, one that is a whole token
    for stop in ("aris", "ance is", " Paris"):
        assert stop in full, full
        want = full[: full.index(stop)]
        body = {"inputs": chat_prompt, "parameters": greedy(20, stop_sequences=[stop])}
        got = post(server, "/generate", body).json()
        assert got["generated_text"] == [want] and got["finish_reason"] == "stop"
        events = stream(server, body)
        assert "".join(e["token"]["text"] for e in events) == want
        assert events[-1]["finish_reason"] == "stop"
    assert slots_drain(server)


def test_dropping_the_connection_mid_stream_frees_the_slots(server):
    assert slots_drain(server)  # idle first: a used slot below must be this request's
    aborted_before = _abort_count(server)
    body = json.dumps({"inputs": "Write a long story about a dragon.", "parameters": greedy(400, ignore_eos=True)}).encode()
    head = (
        f"POST /generate_stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    try:
        sock.sendall(head + body)
        received = b""
        while received.count(b"data:") < 3:
            chunk = sock.recv(65536)
            assert chunk, "server closed the stream early"
            received += chunk
        assert b" 200 " in received.split(b"\r\n", 1)[0]
        deadline = time.monotonic() + 20
        while metric(server, "lightllm_kv_slots_used") == 0:  # the router reports load every 0.1 s
            assert time.monotonic() < deadline, "the running request never showed in /metrics"
            time.sleep(0.05)
    finally:
        sock.close()
    assert slots_drain(server), "slots not freed after the client went away"
    assert _abort_count(server) == aborted_before + 1


def _abort_count(server) -> float:
    return metric_total(server, 'lightllm_requests_finished_total{finish_reason="abort"}')


BAD_INPUTS = [
    # (body, status, words the error must contain)
    (b'{"inputs": "hi", "parameters": {', 400, ["JSON"]),
    (b'{"inputs": 5}', 422, ["inputs"]),
    (b'{"inputs": "hi", "parameters": {"max_new_tokens": "5"}}', 422, ["parameters.max_new_tokens"]),
    (b'{"inputs": "hi", "parameters": {"temperature": -1}}', 400, ["temperature"]),
    (b'{"inputs": "hi", "parameters": {"max_new_tokens": 0}}', 400, ["max_new_tokens"]),
    (json.dumps({"inputs": "hello " * 400}).encode(), 400, ["inputs", "max_req_input_len"]),
    (b'{"inputs": ""}', 400, ["inputs", "empty"]),
    (b'{"parameters": {}}', 400, ["inputs"]),
    (b'{"messages": [{"role": "user"}]}', 400, ["messages"]),
]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_bad_input_is_4xx_naming_the_field_and_the_server_stays_healthy(server, path):
    rejected_before = metric_total(server, "lightllm_requests_rejected_total")
    for raw, status, words in BAD_INPUTS:
        r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == status, (raw[:60], r.status_code, r.text)
        error = r.json()["error"]
        assert all(w in error for w in words), (raw[:60], error)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = post(server, path, {"inputs": "Hello", "parameters": greedy(2, ignore_eos=True)})
    assert r.status_code == 200
    # each bad input counted once, the good request not at all
    assert metric_total(server, "lightllm_requests_rejected_total") == rejected_before + len(BAD_INPUTS)


def test_unknown_keys_are_tolerated_and_n_samples_come_back(server):
    body = {"inputs": "The sky is", "extra": {"x": 1}, "parameters": {"max_new_tokens": 3, "do_sample": True, "seed": 7, "n": 2, "stop_sequences": None, "unknown": 1}}
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    assert len(r.json()["generated_text"]) == 2


COUNTED = ("lightllm_requests_finished_total", "lightllm_prompt_tokens_total", "lightllm_generation_tokens_total",
           "lightllm_time_to_first_token_seconds_count", "lightllm_inter_token_latency_seconds_count")


def test_metrics_count_requests_tokens_and_latencies(server):
    # the server is shared: one request's exact effect on the counters, as deltas
    before = {name: metric_total(server, name) for name in COUNTED}
    length_before = metric_total(server, 'lightllm_requests_finished_total{finish_reason="length"}')
    body = post(server, "/generate", {"inputs": "Once upon a time", "parameters": greedy(5, ignore_eos=True)}).json()
    assert body["count_output_tokens"] == 5
    delta = {name: metric_total(server, name) - before[name] for name in COUNTED}
    assert delta == {
        "lightllm_requests_finished_total": 1,
        "lightllm_prompt_tokens_total": body["prompt_tokens"],
        "lightllm_generation_tokens_total": 5,
        "lightllm_time_to_first_token_seconds_count": 1,
        "lightllm_inter_token_latency_seconds_count": 4,  # between 5 tokens
    }
    assert metric_total(server, 'lightllm_requests_finished_total{finish_reason="length"}') == length_before + 1
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "lightllm_requests_finished_total",
        "lightllm_prompt_tokens_total",
        "lightllm_generation_tokens_total",
        "lightllm_num_requests_running",
        "lightllm_num_requests_waiting",
        "lightllm_kv_slots_used",
        "lightllm_kv_slots_total",
        "lightllm_time_to_first_token_seconds_bucket",
        "lightllm_inter_token_latency_seconds_bucket",
    ):
        assert name in text, name
    assert metric(server, "lightllm_kv_slots_total") == 8192
    assert slots_drain(server), "slots still in use after every request ended"
