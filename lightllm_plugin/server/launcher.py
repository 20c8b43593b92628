"""Starts, watches and stops the server's processes.

The launcher process runs the HTTP api; the tokenizer(s), router and detokenizer (and with
--tp N the tensor-parallel ranks 1..N-1; the router is rank 0) are spawned children. Uvicorn starts only after every child reported ready, so its
"Uvicorn running on http://HOST:PORT" line means the model can answer. If a child dies,
the server says which and exits non-zero; on SIGINT/SIGTERM it drains (server/drain.py: new
requests refused, running ones finished within --drain_timeout) and then stops every child. Either
way the private run directory holding the sockets is removed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import zmq

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.ipc import decode_or_drop, open_socket
from lightllm_plugin.server.detokenizer import run_detokenizer
from lightllm_plugin.server.protocol import (
    Addresses,
    ControlInbox,
    Limits,
    Ready,
    decoder_for,
    encoder,
)
from lightllm_plugin.server.router import run_router
from lightllm_plugin.server.tokenizer import run_tokenizer
from lightllm_plugin.server.tp_rank import run_tp_rank, tp_rank_role

CHILD_STOP_TIMEOUT_S = 5.0
# after a child died: the most time the orderly shutdown may take before a hard exit
HARD_EXIT_AFTER_S = 10.0


def say(message: str) -> None:
    print(f"lightllm-plugin: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    """A fatal error, in uvicorn's form: LazyLLM reads a line starting "ERROR:" as a failed start."""
    print(f"ERROR:    lightllm-plugin: {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    role: str  # "router", "detokenizer", "tokenizer0", ...
    process: multiprocessing.process.BaseProcess

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"died with exit code {code}"

    def describe(self) -> str:
        return f"{self.role} process (pid {self.process.pid})"


class ChildDied(Exception):
    def __init__(self, child: Child):
        super().__init__(f"{child.describe()} {child.describe_exit()}")
        self.child = child


class Pipeline:
    """The child processes of one server."""

    def __init__(self, config: EngineConfig, addresses: Addresses):
        self.config = config
        self.addresses = addresses
        self.children: list[Child] = []
        self._mp = multiprocessing.get_context("spawn")

    def start(self) -> Ready:
        """Start every child and wait until each is ready; the router's report carries the
        model facts. The tokenizers load alongside the model but serve only once told the
        length limits they enforce, which the engine may lower to the model's context."""
        ctx = zmq.Context()
        control = open_socket(ctx, zmq.PULL, self.addresses.control, bind=True)
        try:
            workers = max(1, self.config.tokenizer_workers)
            pipes = [self._mp.Pipe(duplex=False) for _ in range(workers)]
            self._spawn(
                [("router", run_router, ()), ("detokenizer", run_detokenizer, ())]
                + [(tp_rank_role(rank), run_tp_rank, (rank,)) for rank in range(1, self.config.tp)]
                + [(f"tokenizer{i}", run_tokenizer, (reader, i)) for i, (reader, _) in enumerate(pipes)]
            )
            ready = self._wait_ready(control, {"router", "detokenizer"})["router"]
            self.config.max_req_total_len = ready.max_req_total_len
            self.config.max_req_input_len = ready.max_req_input_len
            limits = encoder.encode(Limits(ready.max_req_total_len, ready.max_req_input_len))
            for _, writer in pipes:
                writer.send_bytes(limits)
            self._wait_ready(control, {f"tokenizer{i}" for i in range(workers)})
        finally:
            ctx.destroy(linger=0)
        return ready

    def _spawn(self, specs) -> None:
        started = []
        for role, target, extra in specs:
            args = (self.config, self.addresses, os.getpid(), *extra)
            process = self._mp.Process(target=target, args=args, name=f"lightllm-plugin-{role}")
            process.start()
            started.append(Child(role, process))
        self.children.extend(started)
        say("started " + ", ".join(c.describe() for c in started))

    def _wait_ready(self, control: zmq.Socket, roles: set[str]) -> dict[str, Ready]:
        decoder = decoder_for(ControlInbox)
        reports: dict[str, Ready] = {}
        while roles - reports.keys():
            if control.poll(200):
                ready = decode_or_drop(decoder, control.recv(), "control")
                if ready is not None:
                    reports[ready.role] = ready
            dead = self.first_dead()
            if dead is not None:
                raise ChildDied(dead)
        return reports

    def first_dead(self) -> Child | None:
        return next((c for c in self.children if c.process.exitcode is not None), None)

    def all_alive(self) -> bool:
        return self.first_dead() is None

    def wait_for_death(self, timeout: float) -> Child | None:
        multiprocessing.connection.wait([c.process.sentinel for c in self.children], timeout)
        return self.first_dead()

    def stop(self) -> None:
        for child in self.children:
            if child.process.exitcode is None:
                child.process.terminate()
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
        for child in self.children:
            child.process.join(max(0.0, deadline - time.monotonic()))
        for child in self.children:
            if child.process.exitcode is None:
                child.process.kill()
                child.process.join(1.0)


class Watchdog(threading.Thread):
    """Turns the death of any child into a prompt, non-zero exit of the whole server."""

    def __init__(self, pipeline: Pipeline, on_death):
        super().__init__(name="lightllm-plugin-watchdog", daemon=True)
        self.pipeline = pipeline
        self.on_death = on_death
        self.dead: Child | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            dead = self.pipeline.wait_for_death(0.5)
            if dead is not None and not self._stopping.is_set():
                self.dead = dead
                fail(f"{dead.describe()} {dead.describe_exit()}; shutting down")
                self.on_death(dead)
                return

    def stop(self) -> None:
        self._stopping.set()


def _hard_exit(pipeline: Pipeline, run_dir: str) -> None:
    """Last resort when the orderly shutdown after a child's death hangs."""
    for child in pipeline.children:
        if child.process.exitcode is None:
            child.process.kill()
    shutil.rmtree(run_dir, ignore_errors=True)
    os._exit(1)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def check_port_free(host: str, port: int) -> None:
    """Fail in a second rather than after the model has loaded. (Binding here and handing
    the socket to uvicorn would close the race, but then uvicorn skips the "Uvicorn running
    on" line that LazyLLM waits for.)"""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))


RUN_DIR_PREFIX = "lightllm-plugin-"


def make_run_dir() -> str:
    """A private (0700) directory for the sockets, named after this process."""
    return tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-")


def remove_stale_run_dirs(parent: str | None = None) -> None:
    """A server killed outright (SIGKILL, which is how LazyLLM stops its jobs) cannot remove
    its run directory; the next server start removes those whose owner process is gone."""
    import psutil

    parent = parent or tempfile.gettempdir()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(RUN_DIR_PREFIX):
            continue
        pid, sep, _ = entry.name[len(RUN_DIR_PREFIX):].partition("-")
        if not sep or not pid.isdigit():  # not ours, or from before the pid was in the name
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not psutil.pid_exists(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def resolve_model(config: EngineConfig) -> EngineConfig:
    """Fetch the default model once, here, so the children do not race to download it."""
    from lightllm_plugin.models.tokenizer import resolve_model_path

    _, path = resolve_model_path(config.model_dir)
    return config.replace(model_dir=path)


def serve(config: EngineConfig, plugins=None) -> int:
    """Run the server until SIGINT/SIGTERM (exit code 0) or a child's death (1). `plugins`:
    a loaded PluginManager (default: load them now, before any process starts)."""
    import uvicorn

    from lightllm_plugin.plugins import PluginError, load_plugins
    from lightllm_plugin.server.api import create_app
    from lightllm_plugin.server.drain import Drain, DrainingServer
    from lightllm_plugin.server.engine_client import AsyncEngineClient

    if plugins is None:
        try:
            plugins = load_plugins()
        except PluginError as exc:
            fail(f"{exc} (--skip_broken_plugins starts the server without it)")
            return 1
    # the model processes load the third-party plugins again (their architectures): they skip a
    # broken one exactly when this process did
    config = config.replace(skip_broken_plugins=plugins.skip_broken)
    # SIGTERM takes the same path as Ctrl+C: every child stopped, the run directory removed
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    remove_stale_run_dirs()
    run_dir = make_run_dir()  # mode 0700: only this user reaches the sockets
    pipeline: Pipeline | None = None
    watchdog: Watchdog | None = None
    try:
        try:
            check_port_free(config.host, config.port)
        except OSError as exc:
            fail(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")
            return 1
        try:
            config = resolve_model(config)
        except (OSError, ValueError, RuntimeError) as exc:
            fail(f"cannot serve --model_dir {config.model_dir}: {exc}")
            return 1
        pipeline = Pipeline(config, Addresses(run_dir))
        try:
            ready = pipeline.start()
        except ChildDied as exc:
            fail(f"{exc} while starting; see its error above")
            return 1
        config.total_slots = ready.total_slots
        config.resolved_eos_ids = list(ready.eos_ids)
        config.resolved_model_path = ready.model_path
        config.resolved_dtype, config.resolved_device = ready.dtype, ready.device
        config.resolved_task, config.pooler = ready.task, ready.pooler
        say(f"model {ready.model_path} ready on {ready.device} ({ready.dtype}), {ready.total_slots} KV token slots, task {ready.task}")

        client = AsyncEngineClient(
            Addresses(run_dir), max_queue_size=config.max_queue_size, request_timeout=config.request_timeout,
            pooler=config.pooler,
        )
        try:
            drain = Drain(config.drain_timeout)
            app = create_app(client, config, pipeline.all_alive, plugins, drain=drain)
        except PluginError as exc:
            fail(f"{exc} (--skip_broken_plugins starts the server without it)")
            return 1
        server = DrainingServer(
            uvicorn.Config(app, host=config.host, port=config.port, loop="asyncio", timeout_graceful_shutdown=5), drain
        )

        def on_death(dead: Child) -> None:
            # requests in flight end at once, so the orderly shutdown does not wait on them
            client.fail_all_threadsafe(f"the engine pipeline stopped: {dead.describe()} {dead.describe_exit()}")
            server.should_exit = True
            timer = threading.Timer(HARD_EXIT_AFTER_S, _hard_exit, (pipeline, run_dir))
            timer.daemon = True
            timer.start()

        watchdog = Watchdog(pipeline, on_death)
        watchdog.start()
        server.run()
        return 1 if watchdog.dead is not None else 0
    except KeyboardInterrupt:
        return 1 if watchdog is not None and watchdog.dead is not None else 0
    finally:
        # a second Ctrl+C must not cut the clean-up short and leave children behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if watchdog is not None:
            watchdog.stop()
        if pipeline is not None:
            pipeline.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
