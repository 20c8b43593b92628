"""Graceful drain: SIGTERM while streams run lets them finish, refuses new work at once, exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

STREAMS = 16
NEW_TOKENS = 24
DRAIN_TIMEOUT_S = 60


def _stream(url: str, index: int, started: threading.Barrier, results: dict) -> None:
    body = {"inputs": f"Story number {index}: once upon a time",
            "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}}
    try:
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=DRAIN_TIMEOUT_S) as r:
            events = []
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(json.loads(line[len("data:"):]))
                if len(events) == 1:
                    started.wait(DRAIN_TIMEOUT_S)
            results[index] = (r.status_code, events)
    except Exception as exc:  # noqa: BLE001 - reported by the test below
        results[index] = (None, repr(exc))
        started.abort()


def _long_stream(url: str, started: threading.Barrier, results: dict) -> None:
    body = {"inputs": "Tell me a long story.", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    events = []
    try:
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=DRAIN_TIMEOUT_S) as r:
            for line in r.iter_lines():
                if line:
                    events.append(json.loads(line[len("data:"):]))
                    if len(events) == 1:
                        started.wait(DRAIN_TIMEOUT_S)
    except httpx.RemoteProtocolError:
        pass  # the server went away mid-stream: what the second signal is for
    results["long"] = events


@pytest.mark.slow
def test_sigterm_during_16_streams_finishes_them_refuses_new_ones_and_a_second_signal_ends_it(launch_server):
    """16 short streams and one long one run; SIGTERM: new requests get 503 and /health fails at
    once, the 16 finish; a second SIGTERM then ends the drain the long one still holds; exit 0."""
    server = launch_server("--drain_timeout", str(DRAIN_TIMEOUT_S))
    results: dict = {}
    started = threading.Barrier(STREAMS + 2)
    threads = [threading.Thread(target=_stream, args=(server.url, i, started, results), daemon=True)
               for i in range(STREAMS)]
    threads.append(threading.Thread(target=_long_stream, args=(server.url, started, results), daemon=True))
    for t in threads:
        t.start()
    started.wait(DRAIN_TIMEOUT_S)  # every stream has its first token: all 17 are running
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    # refused at once, with a hint to retry; the balancer's probe fails at once too
    deadline = time.monotonic() + 5
    while True:  # the signal is asynchronous: the first request may still slip in before it lands
        r = httpx.post(server.url + "/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 1}, timeout=5)
        if r.status_code == 503 or time.monotonic() > deadline:
            break
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"].isdigit()
    assert "shutting down" in r.json()["error"]["message"]  # the OpenAI shape under /v1
    assert r.elapsed.total_seconds() < 1
    assert httpx.get(server.url + "/health", timeout=5).status_code == 503

    for t in threads[:STREAMS]:
        t.join(DRAIN_TIMEOUT_S)
    assert sorted(k for k in results if k != "long") == list(range(STREAMS))
    for index in range(STREAMS):
        status, events = results[index]
        assert status == 200, (index, events)
        assert len(events) == NEW_TOKENS and events[-1]["finished"], (index, events[-3:])
        assert events[-1]["finish_reason"] == "length"
    assert server.proc.poll() is None, "the long stream still runs: the drain waits for it"

    server.proc.send_signal(signal.SIGTERM)
    cut = time.monotonic()
    code = server.proc.wait(15)
    assert time.monotonic() - cut < 10
    threads[-1].join(10)
    assert not any(e["finished"] for e in results["long"])  # cut off, not finished
    assert code == 0, server.output[-3000:]
    assert time.monotonic() - signalled < DRAIN_TIMEOUT_S
    assert server.leftover_processes(timeout=10) == []
    assert server.run_dir and not os.path.exists(server.run_dir)
    assert "draining 17 request(s)" in server.output
    # at least the long stream: a short one whose last event the client has read may still be
    # leaving the app (its call returns a moment later), so the count is not exact
    cut_off = re.search(r"SIGTERM again: stopping now, (\d+) request\(s\) cut off", server.output)
    assert cut_off and 1 <= int(cut_off.group(1)) <= STREAMS + 1, server.output[-3000:]


def test_the_drain_timeout_ends_a_drain_that_a_request_still_holds():
    """DrainingServer itself, on a real uvicorn with an endless stream: after the signal the
    timeout (0.5 s) stops the server although the stream never ends."""
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    from support.live_server import free_port

    from lightllm_plugin.server.drain import Drain, DrainingServer, DrainMiddleware

    async def endless(request):
        async def ticks():
            while True:
                yield b"tick\n"
                await asyncio.sleep(0.05)
        return StreamingResponse(ticks())

    async def health(request):
        return JSONResponse({"status": "ok"})

    drain = Drain(0.5)
    app = DrainMiddleware(Starlette(routes=[Route("/stream", endless), Route("/health", health)]), drain)
    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), drain)
    thread = threading.Thread(target=server.run, daemon=True)  # off the main thread: no signal handlers
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    with httpx.stream("GET", url + "/stream", timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines) == "tick"
        assert drain.in_flight == 1
        server.handle_exit(signal.SIGTERM, None)
        signalled = time.monotonic()
        refused = httpx.get(url + "/health", timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
        assert refused.json() == {"error": "the server is shutting down; retry on another"}  # the native shape
        thread.join(5)
        assert not thread.is_alive()
        assert 0.5 <= time.monotonic() - signalled < 3
