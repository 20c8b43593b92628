"""A real server under bad input, overload, hostile socket peers and dead children (a failing
model step: test_step_faults.py). CPU, the default model, loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import time

import httpx
import msgspec
import pytest
import zmq
from support.live_server import metric_total, slots_drain

TIMEOUT_S = 4  # --request_timeout of the server below
QUEUE = 4  # --max_queue_size
BODY_LIMIT = 2 * 1024 * 1024  # --max_body_size: a 1 MB prompt still reaches the tokenizer


@pytest.fixture(scope="module")
def server(launch_server):
    return launch_server(
        "--max_queue_size", str(QUEUE), "--request_timeout", str(TIMEOUT_S), "--max_body_size", str(BODY_LIMIT)
    )


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def error_text(path: str, response: httpx.Response) -> str:
    """The message of an error, checked to be in the route's own shape."""
    error = response.json()["error"]
    if path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == ("invalid_request_error" if response.status_code < 500 else "server_error")
        return error["message"]
    assert isinstance(error, str), error
    return error


# ---- the bad-input battery -----------------------------------------------------------------
NATIVE = ("/generate", "/generate_stream")
OPENAI = ("/v1/completions", "/v1/chat/completions")
ALL = NATIVE + OPENAI
JSON = {"content-type": "application/json"}
MB_PROMPT = "word " * 200_000  # 1 MB


def _body_cases():
    """(path, raw body, headers, status, words the message must contain): every route."""
    cases = []
    for path in ALL:
        cases += [
            (path, b'{"inputs": "hi", "parameters": {', JSON, 400, ["JSON"]),
            (path, b"", JSON, 400, ["JSON"]),
            (path, b'{"model": "\xff\xfe", "inputs": "\xff", "prompt": "\xff"}', JSON, 400, ["UTF-8"]),
            (path, b"[1, 2]", JSON, 422, ["object"]),
            (path, b'{"a": NaN}', JSON, 400, ["JSON"]),
            (path, b'{"a": Infinity}', JSON, 400, ["JSON"]),
            (path, b"inputs=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, ["Content-Type"]),
            (path, b'{"inputs": "' + b"x" * (BODY_LIMIT + 10) + b'"}', JSON, 413, ["max_body_size"]),
        ]
    for path in NATIVE:
        cases.append((path, b'{"inputs": "hi", "parameters": {"temperature": 1e999}}', JSON, 422, ["parameters.temperature"]))
    for path in OPENAI:
        cases.append((path, b'{"model": "m", "prompt": "hi", "messages": [], "top_p": -1e999}', JSON, 422, ["top_p"]))
    return cases


def _native_cases():
    p = lambda **kw: {"inputs": "hi", "parameters": kw}  # noqa: E731
    return [
        ({"inputs": 5}, 422, ["inputs"]),
        ({"inputs": ""}, 400, ["inputs", "empty"]),
        ({"inputs": MB_PROMPT}, 400, ["inputs", "max_req_input_len"]),
        ({"inputs": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, ["either"]),
        ({"messages": []}, 400, ["messages"]),
        ({"messages": ["x"]}, 422, ["messages[0]"]),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, 400, ["messages"]),
        (p(max_new_tokens="5"), 422, ["parameters.max_new_tokens"]),
        (p(max_new_tokens=0), 400, ["max_new_tokens"]),
        (p(max_new_tokens=-3), 400, ["max_new_tokens"]),
        (p(max_new_tokens=10**30), 400, ["parameters.max_new_tokens"]),
        (p(temperature=-1), 400, ["temperature"]),
        (p(top_p=0), 400, ["top_p"]),
        (p(top_p=1.5), 400, ["top_p"]),
        (p(top_k=-5), 400, ["top_k"]),
        (p(repetition_penalty=0), 400, ["repetition_penalty"]),
        (p(presence_penalty=3), 400, ["presence_penalty"]),
        (p(seed=2**64 + 5), 400, ["seed"]),
        (p(seed="x"), 422, ["parameters.seed"]),
        (p(n=0), 400, ["n "]),
        (p(n=10**6), 400, ["n "]),
        (p(stop_sequences=[""]), 400, ["stop"]),
        (p(stop_sequences=5), 422, ["stop_sequences"]),
        (p(do_sample="yes"), 422, ["do_sample"]),
        ({"inputs": "hi", "parameters": [1]}, 422, ["parameters"]),
        (p(regular_constraint="[a-"), 400, ["parameters.regular_constraint", "invalid regex"]),
        (p(guided_json=[1]), 400, ["parameters.guided_json"]),
        (p(allowed_token_ids=[]), 400, ["allowed_token_ids"]),
    ]


def _openai_cases(model):
    chat = lambda **kw: ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw})  # noqa: E731
    comp = lambda **kw: ("/v1/completions", {"model": model, "prompt": "hi", **kw})  # noqa: E731
    return [
        (*chat(model="gpt-4o"), 404, ["gpt-4o"]),
        (*comp(model="gpt-4o"), 404, ["gpt-4o"]),
        (*chat(n=0), 400, ["n "]),
        (*comp(n=0), 400, ["n "]),
        (*comp(logprobs=100), 400, ["logprobs"]),
        (*chat(logprobs=True, top_logprobs=100), 400, ["top_logprobs"]),
        (*chat(temperature=-1), 400, ["temperature"]),
        (*comp(temperature="hot"), 422, ["temperature"]),
        (*chat(max_tokens=600), 400, ["max_tokens", "max_req_total_len"]),
        (*comp(max_tokens=2**62), 400, ["max_tokens"]),
        (*comp(max_tokens=100_000), 400, ["max_tokens", "max_req_total_len"]),
        (*comp(max_tokens=-1), 400, ["max_tokens"]),
        (*chat(seed=2**64 + 5), 400, ["seed"]),
        (*comp(prompt=""), 400, ["prompt"]),
        (*comp(prompt=[]), 400, ["prompt"]),
        (*comp(prompt=[2**40]), 400, ["prompt", "vocabulary"]),
        (*comp(prompt=[-1]), 400, ["prompt", "vocabulary"]),
        (*comp(prompt=MB_PROMPT), 400, ["prompt", "max_req_input_len"]),
        (*comp(prompt={"a": 1}), 400, ["prompt"]),
        (*chat(messages=[]), 400, ["messages"]),
        (*chat(messages=[{"role": "wizard", "content": "hi"}]), 400, ["role"]),
        (*chat(messages=[{"role": "user", "content": 5}]), 400, ["content"]),
        (*chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, ["content[0].image_url.url must be a string"]),
        (*chat(tools=[1]), 400, ["tools[0]"]),
        (*chat(tool_choice={"type": "function", "function": {"name": "g"}},
               tools=[{"type": "function", "function": {"name": "f"}}]), 400, ["tool_choice", "'g'"]),
        (*chat(tool_choice="required"), 400, ["tool_choice"]),
        (*comp(guided_regex="(("), 400, ["guided_regex", "invalid regex"]),
        (*chat(guided_json=5), 400, ["guided_json"]),
        (*comp(structured_outputs={"choice": 5}), 400, ["structured_outputs", "choice"]),
        (*chat(guided_choice=["a"], guided_regex="a"), 400, ["one output constraint"]),
        (*chat(stream_options={"include_usage": True}), 400, ["stream_options"]),
        (*chat(logit_bias={"1": 5}), 400, ["logit_bias"]),
        (*chat(response_format={"type": "xml"}), 400, ["response_format"]),
        # a request-supplied chat template is rendered in the sandbox: no attribute escape
        # a request may not replace the model's template (the sandbox is shown below for the model's own)
        (*chat(chat_template_kwargs={"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}), 400,
         ["chat_template_kwargs", "chat_template cannot be set"]),
        (*chat(chat_template_kwargs={"chat_template": "{{ cycler.__init__.__globals__.os.system('id') }}"}), 400,
         ["chat_template_kwargs", "chat_template cannot be set"]),
        ("/v1/completions", {"prompt": "hi"}, 422, ["model"]),
        (*chat(stop_token_ids=[2**40]), 400, ["stop_token_ids"]),
        (*comp(top_k=2**40), 400, ["top_k"]),
    ]


def _check(failures: list[str], path: str, what, r: httpx.Response, status: int, words: list[str]) -> None:
    try:
        assert r.status_code == status, f"status {r.status_code}, want {status}: {r.text[:200]}"
        assert "Traceback" not in r.text
        message = error_text(path, r)
        assert all(w in message for w in words), f"{words} not in {message!r}"
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        failures.append(f"{path} {what!r}: {exc}")


def test_a_battery_of_bad_requests_gets_4xx_in_each_routes_shape(server, model):
    start = time.monotonic()
    count = 0
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, raw, headers, status, words in _body_cases():
            r = http.post(path, content=raw, headers=headers)
            _check(failures, path, raw[:60], r, status, words)
            count += 1
        for path in NATIVE:
            for body, status, words in _native_cases():
                try:
                    r = http.post(path, json=body)
                except httpx.HTTPError as exc:
                    failures.append(f"{path} {str(body)[:80]}: {exc!r}")
                    continue
                _check(failures, path, str(body)[:80], r, status, words)
                count += 1
        for path, body, status, words in _openai_cases(model):
            r = http.post(path, json=body)
            _check(failures, path, str(body)[:80], r, status, words)
            count += 1
        for method, path, status in [("GET", "/v1/models/gpt-4o", 404), ("GET", "/nowhere", 404), ("GET", "/generate", 405),
                                      ("DELETE", "/v1/chat/completions", 405)]:
            r = http.request(method, path)
            _check(failures, path, method, r, status, [])
            count += 1
        assert http.get("/health").json() == {"status": "ok"}
        assert http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).status_code == 200
    assert not failures, "\n".join(failures)
    assert count >= 60
    assert slots_drain(server)
    print(f"{count} bad requests in {time.monotonic() - start:.1f}s")


# ---- overload and timeouts -------------------------------------------------------------------
def test_a_burst_over_max_queue_size_gets_503_with_retry_after_and_the_rest_complete(server, model):
    async def one(client, i):
        if i % 2:
            body = {"inputs": f"Count to {i}:", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
            r = await client.post("/generate", json=body)
        else:
            body = {"model": model, "prompt": f"Count to {i}:", "max_tokens": 4}
            r = await client.post("/v1/completions", json=body)
        return i, r

    async def burst():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    rejected = 'lightllm_requests_rejected_total{status="503"}'
    rejected_before = metric_total(server, rejected)  # 0 before the first refusal
    start = time.monotonic()
    results = asyncio.run(burst())
    codes = [r.status_code for _, r in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= QUEUE, codes
    for i, r in results:
        path = "/generate" if i % 2 else "/v1/completions"
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert "max_queue_size" in error_text(path, r)
        elif i % 2:
            assert r.json()["count_output_tokens"] == 4
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
    assert slots_drain(server)
    assert metric_total(server, rejected) == rejected_before + codes.count(503)
    print(f"burst of 50: {codes.count(200)} served, {codes.count(503)} refused, {time.monotonic() - start:.1f}s")


def test_the_openai_sdk_retries_after_a_503(server, model):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=5, timeout=60) as client:
        async def flood():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=8, timeout=60) as c:
                return await asyncio.gather(
                    *(c.completions.create(model=model, prompt="Hi", max_tokens=3) for _ in range(12))
                )

        done = asyncio.run(flood())
        assert len(done) == 12  # every one got through, retrying on Retry-After
        assert client.models.list().data


def test_a_request_over_the_timeout_is_aborted_with_504_and_its_slots_freed(server, model):
    body = {"inputs": "Tell me a very long story.", "parameters": {"max_new_tokens": 500, "ignore_eos": True}}
    start = time.monotonic()
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    took = time.monotonic() - start
    assert r.status_code == 504, r.text[:200]
    assert "request_timeout" in r.json()["error"]
    assert TIMEOUT_S <= took < TIMEOUT_S + 5
    chat = {"model": model, "messages": [{"role": "user", "content": "A long story, please."}], "max_tokens": 400,
            "ignore_eos": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 504 and "request_timeout" in error_text("/v1/", r)
    assert slots_drain(server)


# ---- hostile peers on the pipeline's sockets ------------------------------------------------
class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def test_a_pickle_or_garbage_on_any_socket_executes_nothing_and_the_server_keeps_serving(server, tmp_path):
    from lightllm_plugin.sampling_params import SamplingParams
    from lightllm_plugin.server.protocol import AddRequest, encoder

    marker = tmp_path / "pwned"
    payloads = [
        pickle.dumps(_Exploit(str(marker))),
        b"\x00garbage\xff" * 10,
        msgspec.msgpack.encode({"type": "Nope", "x": 1}),
        encoder.encode(AddRequest(req_id=10**12, prompt_ids=[2**40], params=SamplingParams())),
    ]
    names = sorted(os.listdir(server.run_dir))
    assert {"tokenizer", "router", "detokenizer", "api"} <= set(names)
    ctx = zmq.Context()
    try:
        for name in names:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(f"ipc://{os.path.join(server.run_dir, name)}")
            for payload in payloads:
                sock.send(payload)
            sock.send_multipart([b"two", b"frames"])
            sock.close()
    finally:
        ctx.term()
    time.sleep(1.0)
    assert not marker.exists()
    assert server.proc.poll() is None
    r = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert "dropped an unexpected message on the router socket" in server.output
    assert "dropped an unexpected message on the detokenizer socket" in server.output
    assert "dropped an unexpected message on the api socket" in server.output
    # the tokenizer's inbox is the api's bound PUSH socket: a PUSH peer cannot even connect to it
    assert slots_drain(server)


def test_decode_or_drop_refuses_oversized_and_foreign_frames():
    from lightllm_plugin.ipc import decode_or_drop
    from lightllm_plugin.server.protocol import (
        AbortRequest,
        RouterInbox,
        decoder_for,
        encoder,
    )

    decoder = decoder_for(RouterInbox)
    frame = encoder.encode(AbortRequest(req_ids=[1]))
    assert decode_or_drop(decoder, frame, "router") == AbortRequest(req_ids=[1])
    assert decode_or_drop(decoder, frame, "router", max_bytes=len(frame) - 1) is None
    assert decode_or_drop(decoder, pickle.dumps({"a": 1}), "router") is None


# ---- a dead child takes the server down, whichever it is ------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("role", ["tokenizer0", "detokenizer"])  # the router: test_server_lifecycle
def test_killing_a_child_stops_the_server_naming_it(launch_server, role):
    victim = launch_server()
    child = victim.child(role)
    start = time.monotonic()
    child.kill()
    code = victim.wait_ended_by(f"{role} process (pid {child.pid}) was killed by signal SIGKILL", timeout=10)
    print(f"{role}: server exited {code} in {time.monotonic() - start:.1f}s")


def test_sandboxed_chat_template_blocks_escapes_in_the_tokenizer():
    """The tokenizer process renders templates through transformers' ImmutableSandboxedEnvironment,
    so a hostile template shipped with a model cannot reach Python's internals."""
    from lightllm_plugin.models.tokenizer import load_tokenizer
    from lightllm_plugin.sampling_params import SamplingParams
    from lightllm_plugin.server.protocol import TokenizeRequest
    from lightllm_plugin.server.tokenizer import encode_prompt

    tokenizer = load_tokenizer(None)
    for template in ("{{ ''.__class__.__mro__ }}", "{% set x = [].append(1) %}{{ x }}",
                     "{{ lipsum.__globals__['os'].popen('id').read() }}"):
        tokenizer.chat_template = template
        req = TokenizeRequest(req_ids=[0], params=SamplingParams(), messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(ValueError, match="chat template could not render"):
            encode_prompt(tokenizer, req)


def test_json_in_body_size_limit_counts_chunked_bodies(server):
    def chunks():
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"x" * 65536

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=JSON, timeout=60)
    assert r.status_code == 413 and "max_body_size" in error_text("/v1/", r)
    assert json.loads(httpx.get(server.url + "/health", timeout=10).text)["status"] == "ok"
