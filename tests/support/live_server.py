"""A real server in a subprocess on 127.0.0.1, and small helpers to talk to it.

A pytest plugin (tests/conftest.py lists it in `pytest_plugins`), so its fixtures reach every
test directory:
- `default_server`: ONE server with the default model and BASE_FLAGS, started the first time a
  test asks for it and shared by the whole session. Tests on it must leave it as they found it
  (no slot held, nothing queued) and read counters as before/after deltas, since other modules
  use it too.
- `launch_server(*flags)`: a module's own servers, for tests that need other flags, a tiny model,
  kill a child, overload the queue or need counters from zero.
Either way, teardown checks that SIGTERM stops the server with exit code 0, leaving no process
and no run directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

STARTUP_TIMEOUT_S = 300  # first run on a fresh machine converts the tokenizer and loads the model
SHUTDOWN_TIMEOUT_S = 20
# memory stays small on CI: a modest KV pool, short requests
BASE_FLAGS = ["--max_total_token_num", "8192", "--max_req_input_len", "256", "--max_req_total_len", "512"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *flags: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lightllm_plugin.server", "--port", str(self.port), *BASE_FLAGS, *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=None if env is None else {**os.environ, **env})
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        self.descendants: list[psutil.Process] = []
        self.run_dir: str | None = None

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            sys.stderr.write(f"[server] {line}")
            if f"Uvicorn running on {self.url}" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._ready.wait(0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n{self.output}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{self.output}")
        me = psutil.Process(self.proc.pid)
        self.descendants = me.children(recursive=True)
        dirs = {os.path.dirname(c.laddr) for c in me.net_connections(kind="unix") if "lightllm-plugin-" in (c.laddr or "")}
        self.run_dir = dirs.pop() if len(dirs) == 1 else None

    def child(self, role: str) -> psutil.Process:
        """A pipeline child by its role; each names itself lightllm:<role> (15 chars at most)."""
        name = f"lightllm:{role}"[:15]
        matches = [p for p in self.descendants if p.is_running() and p.name() == name]
        assert len(matches) == 1, f"expected one {name} among {[p.name() for p in self.descendants]}"
        return matches[0]

    def leftover_processes(self, timeout: float = 10.0) -> list[psutil.Process]:
        _, alive = psutil.wait_procs(self.descendants, timeout=timeout)
        return alive

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it hangs; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def wait_ended_by(self, message: str, timeout: float) -> int:
        """After one of its processes died: the exit code, once the server has exited within
        `timeout` s, non-zero and printing `message`, leaving no process and no run directory."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {timeout}s after {message!r} should have ended it:\n{self.output}")
        assert code != 0
        assert message in self.output
        assert self.leftover_processes(timeout=10) == []
        assert self.run_dir and not os.path.exists(self.run_dir)
        return code

    def reap(self) -> list[int]:
        """Kill whatever the server left behind; the pids that were still alive."""
        alive = self.leftover_processes(timeout=10)
        for p in alive:
            p.kill()
        return [p.pid for p in alive]


def check_clean_stop(server: ServerProcess) -> None:
    """SIGTERM `server`; it must exit with code 0 leaving no process and no run directory."""
    code = server.stop()
    leftovers = server.reap()
    assert code == 0, f"SIGTERM should stop the server with exit code 0, got {code}"
    assert not leftovers, f"processes {leftovers} outlived the server"
    assert server.run_dir and not os.path.exists(server.run_dir), "run dir left behind"


@pytest.fixture(scope="module")
def launch_server():
    """Start servers with launch_server(*flags); teardown checks SIGTERM stops each cleanly
    (a server a test already ended, e.g. by killing a child, is only reaped)."""
    started: list[ServerProcess] = []

    def launch(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(*flags, env=env)
        started.append(server)
        server.wait_ready()
        return server

    yield launch
    problems = []
    for server in started:  # every one is stopped, even after another one's check failed
        if server.proc.poll() is None:
            try:
                check_clean_stop(server)
            except AssertionError as exc:
                problems.append(str(exc))
        else:
            server.reap()
    assert not problems, "; ".join(problems)


@pytest.fixture(scope="session")
def default_server():
    """The session's one server with the default model and BASE_FLAGS only (see the module
    docstring). Nothing may stop it early: at session end it must still be running, and SIGTERM
    must stop it cleanly."""
    server = ServerProcess()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        server.reap()
        raise
    yield server
    exited = server.proc.poll()
    if exited is not None:
        server.reap()
        pytest.fail(f"the shared default server exited with {exited} during the session:\n{server.output[-4000:]}")
    check_clean_stop(server)


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def metric_total(server: ServerProcess, name: str) -> float:
    """A counter summed over all its labels (0 while no sample has a label yet)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def slots_drain(server: ServerProcess, timeout: float = 20.0) -> bool:
    """Whether, within `timeout` s, no KV slot is used and no request is running or waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(server, "lightllm_kv_slots_used") == 0 and metric(server, "lightllm_num_requests_running") == 0
                and metric(server, "lightllm_num_requests_waiting") == 0):
            return True
        time.sleep(0.2)
    return False


def sse_events(lines) -> list[dict]:
    """LightLLM's stream framing: `data:{json}` events, no [DONE] line."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data:"), line
        assert line != "data:[DONE]"
        events.append(json.loads(line[len("data:"):]))
    return events
