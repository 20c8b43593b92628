"""A model step that raises, as a failing model worker would: a test-only architecture of
tests/plugins/test_models_plugin fails any step holding a marker token, so the fault comes from
inside the model, with nothing in the server told about it. A tiny random checkpoint, CPU."""

from __future__ import annotations

import httpx
import pytest
from lightllm_test_models import FAULT_TOKEN_ENV, FAULTY
from support.live_server import free_port, slots_drain
from support.model_plugin import build_tiny_checkpoint, with_pythonpath

pytestmark = pytest.mark.slow
MARKER = " volcano"  # one token of the default model's tokenizer; no other prompt here holds it


@pytest.fixture(scope="module")
def faulty_model(tmp_path_factory) -> str:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("faulty"), FAULTY)


@pytest.fixture(scope="module")
def fault_env(faulty_model, test_models_plugin) -> dict[str, str]:
    from lightllm_plugin.models.tokenizer import load_tokenizer

    ids = load_tokenizer(faulty_model).encode(MARKER, add_special_tokens=False)
    assert len(ids) == 1, ids
    return with_pythonpath(test_models_plugin, **{FAULT_TOKEN_ENV: str(ids[0])})


@pytest.fixture(scope="module")
def server(launch_server, faulty_model, fault_env):
    return launch_server("--model_dir", faulty_model, env=fault_env)


def test_a_failing_step_fails_its_requests_with_500_and_the_server_goes_on(server):
    r = httpx.post(server.url + "/generate", json={"inputs": "Hello" + MARKER, "parameters": {"max_new_tokens": 4}},
                   timeout=60)
    assert r.status_code == 500 and "the model failed" in r.json()["error"], r.text
    assert "Traceback" not in r.text
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "Hi" + MARKER, "max_tokens": 3},
                   timeout=60)
    error = r.json()["error"]
    assert r.status_code == 500 and error["type"] == "server_error" and "the model failed" in error["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    good = httpx.post(server.url + "/generate",
                      json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "ignore_eos": True}}, timeout=60)
    assert good.status_code == 200 and good.json()["count_output_tokens"] == 3
    assert slots_drain(server)
    assert "a step failed" in server.output and "StepFault" in server.output


def test_a_failed_step_under_tp_answers_its_request_and_ends_the_server_naming_the_router(
    launch_server, faulty_model, fault_env
):
    """Rank 1 has the step's plan and waits in its collectives for rank 0, whose step failed: no
    later step could pair with it, so the router stops and the server exits, leaving nothing."""
    server = launch_server("--model_dir", faulty_model, "--tp", "2", "--nccl_port", str(free_port()), env=fault_env)
    ok = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
                    timeout=120)
    assert ok.status_code == 200
    try:
        bad = httpx.post(server.url + "/generate", timeout=60,
                         json={"inputs": "Hello" + MARKER, "parameters": {"max_new_tokens": 2}})
        assert bad.status_code in (500, 503), bad.text
    except httpx.TransportError:
        pass  # the server went down before it could write the answer
    server.wait_ended_by("a failed step leaves the 2 tensor-parallel ranks out of step", timeout=15)
    assert "router process" in server.output
