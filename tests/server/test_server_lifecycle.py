"""Start-up, truncation and death of a real server: a dead child takes the server down."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import httpx
import pytest

EXIT_TIMEOUT_S = 15


@pytest.fixture(scope="module")
def server(launch_server):
    return launch_server("--long_truncation_mode", "head")


def test_sockets_live_in_a_private_run_dir(server):
    assert server.run_dir and os.path.isdir(server.run_dir)
    assert stat.S_IMODE(os.stat(server.run_dir).st_mode) == 0o700
    assert all(stat.S_ISSOCK(os.stat(os.path.join(server.run_dir, f)).st_mode) for f in os.listdir(server.run_dir))


def test_head_truncation_keeps_the_end_of_a_long_prompt(server):
    body = {"inputs": "hello " * 400 + "The end.", "parameters": {"max_new_tokens": 2, "ignore_eos": True}}
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_tokens"] == 256  # --max_req_input_len


def test_killing_the_router_stops_the_server_and_every_child(server):
    router = server.child("router")
    body = {"inputs": "Tell me a long story.", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        router.kill()
        # the stream in flight ends promptly, unfinished, instead of hanging
        events = [json.loads(line[5:]) for line in lines if line]
    assert not any(e["finished"] for e in events)
    server.wait_ended_by(f"router process (pid {router.pid}) was killed by signal SIGKILL", timeout=EXIT_TIMEOUT_S)


def test_a_missing_model_is_a_clear_error_not_a_traceback():
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lightllm_plugin.server", "--model_dir", "/no/such/model"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "/no/such/model" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60


def test_a_taken_port_fails_fast_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "lightllm_plugin.server", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
