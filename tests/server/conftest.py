"""Servers for the tests: one real server subprocess per module, always shut down."""

from __future__ import annotations

import os

import pytest

from live_server import ServerProcess


@pytest.fixture(scope="module")
def launch_server():
    """Start servers with launch_server(*flags); teardown checks SIGTERM stops each cleanly."""
    started: list[ServerProcess] = []

    def launch(*flags: str) -> ServerProcess:
        server = ServerProcess(*flags)
        started.append(server)
        server.wait_ready()
        return server

    yield launch
    for server in started:
        was_running = server.proc.poll() is None
        code = server.stop()
        leftovers = server.reap()
        if was_running:
            assert code == 0, f"SIGTERM should stop the server with exit code 0, got {code}"
            assert not leftovers, f"processes {leftovers} outlived the server"
            assert server.run_dir and not os.path.exists(server.run_dir), "run dir left behind"
