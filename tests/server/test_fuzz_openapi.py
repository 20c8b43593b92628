"""Property-based fuzzing of the HTTP API from its own OpenAPI document.

Schemathesis reads /openapi.json from a real server (CPU, the default model, loopback) and
generates requests for every operation, valid ones (positive) and invalid ones (negative),
from the request-body schemas the routes publish (the same msgspec structs they decode
with). Every answer must come back within the per-request time limit (no hang), none may be
a 5xx, every error must be JSON in its route's shape without a traceback, and afterwards the
server is healthy with no KV slot held.

Bounded: a few examples per operation and mode, a short context (so one generation is a few
dozen tokens at most), fixed randomness (derandomize) so a failure reproduces; set
LIGHTLLM_FUZZ_EXAMPLES to fuzz longer and LIGHTLLM_FUZZ_SEED to explore other inputs.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from support.live_server import metric, slots_drain  # noqa: E402

pytestmark = pytest.mark.slow  # a few hundred generated requests

EXAMPLES = int(os.environ.get("LIGHTLLM_FUZZ_EXAMPLES", "6"))  # per operation and mode
SEED = os.environ.get("LIGHTLLM_FUZZ_SEED")
CALL_TIMEOUT_S = 60  # no single answer may take longer: a hang fails the test
# a short context keeps every generation small on CPU; many requests fit at once
FLAGS = ("--max_req_input_len", "32", "--max_req_total_len", "48")


@pytest.fixture(scope="module")
def server(launch_server):
    return launch_server(*FLAGS)


def _error_shape(case, response) -> None:
    """A custom check: a 4xx is JSON in its route's error shape, with no traceback."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return
    assert "Traceback" not in response.text, response.text[:500]
    error = response.json()["error"]
    if case.path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == "invalid_request_error" and error["message"], error
    else:
        assert isinstance(error, str) and error, error


def _settings():
    return hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=SEED is None,
        # no shrinking: a failure is reported as generated, and the test stays bounded in time
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=True,
    )


def test_the_openapi_document_describes_the_request_bodies(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for path in ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["type"] == "object" and schema["properties"], path
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(chat["required"]) == {"model", "messages"}
    completion = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(completion["required"]) == {"model", "prompt"}


def test_fuzzing_every_operation_from_the_openapi_document_gives_no_5xx_and_no_hang(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=30)
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def served_model(case):
        # `model` is any string in the schema and almost all of them are unknown (404); half the
        # valid OpenAI bodies name the served model, so that they reach the engine
        if isinstance(case.body, dict):
            case.body = {**case.body, "model": model}
        return case

    def few_samples(case):
        # n goes up to 128 and hypothesis likes bounds: 128 samples of one request take many
        # seconds on CPU. Keep the valid bodies cheap (n in 1..4); the bounds themselves are
        # covered by the bad-input battery (test_reliability.py)
        body = case.body
        if isinstance(body, dict):
            if isinstance(body.get("n"), int) and body["n"] > 4:
                case.body = body = {**body, "n": body["n"] % 4 + 1}
            parameters = body.get("parameters")
            if isinstance(parameters, dict) and isinstance(parameters.get("n"), int) and parameters["n"] > 4:
                case.body = {**body, "parameters": {**parameters, "n": parameters["n"] % 4 + 1}}
        return case

    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert {"POST /generate", "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= set(labels)

    statuses: dict[int, int] = {}
    calls = 0
    slowest = 0.0
    start = time.monotonic()
    for op in operations:
        modes = [GenerationMode.POSITIVE]
        if op.method.upper() == "POST" and len(op.body):
            # without a body (the GETs, POST /flush_cache) there is nothing to make invalid but the path
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE and op.method.upper() == "POST":
                strategy = strategy.map(few_samples)
                if op.path.startswith("/v1/"):
                    strategy = strategy | strategy.map(served_model)

            @_settings()
            @hypothesis.given(case=strategy)
            def fuzz(case):
                nonlocal calls, slowest
                began = time.monotonic()
                response = case.call(base_url=server.url, timeout=CALL_TIMEOUT_S)
                slowest = max(slowest, time.monotonic() - began)
                calls += 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error])
                _error_shape(case, response)

            if SEED is not None:
                fuzz = hypothesis.seed(int(SEED))(fuzz)
            fuzz()

    took = time.monotonic() - start
    print(f"fuzzed {len(operations)} operations: {calls} requests in {took:.1f}s, slowest {slowest:.1f}s, "
          f"statuses {dict(sorted(statuses.items()))}")
    assert calls >= len(operations) * 2
    assert not any(code >= 500 for code in statuses)
    # the valid requests reached the model: some generations were answered with 200
    assert statuses.get(200, 0) > 0
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert slots_drain(server)
    assert metric(server, "lightllm_kv_slots_used") == 0
