"""Graceful drain: on the first SIGTERM/SIGINT the server refuses new requests (503 with
Retry-After, /health included, so a balancer moves away at once), lets the running ones
finish for up to --drain_timeout seconds, then exits 0. A second signal, or the timeout,
ends it at once.

The state lives in `Drain`; `DrainMiddleware` counts the requests in progress and refuses
new ones; `DrainingServer` is uvicorn's server with the first signal turned into a drain.
"""

from __future__ import annotations

import math
import signal
import sys
import time

import uvicorn

from lightllm_plugin.server.http_util import send_error

# what a refused client is told to wait: a replacement server (or another replica) is usually up by then
RETRY_AFTER_S = 1
# answered while draining, so scrapers still see the last figures
ALWAYS_OPEN_PATHS = frozenset({"/metrics"})


class Drain:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.in_flight = 0
        self.deadline: float | None = None  # set when the drain begins

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def done(self) -> bool:
        return self.in_flight == 0

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class DrainMiddleware:
    """Counts HTTP requests in progress (a streamed one until its last chunk is sent) and,
    once the drain has begun, answers new ones 503."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            headers = [(b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]
            return await send_error(send, scope["path"], 503, "the server is shutting down; retry on another", headers=headers)
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


def _say(message: str) -> None:
    print(f"lightllm-plugin: {message}", file=sys.stderr, flush=True)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but its first exit signal starts a drain instead of closing the
    listening socket: the balancer in front gets a fast 503 rather than a refused connection."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain.timeout <= 0:  # no drain: uvicorn's own shutdown
            return super().handle_exit(sig, frame)
        if self.drain.draining or self.should_exit:
            _say(f"{signal.Signals(sig).name} again: stopping now, {self.drain.in_flight} request(s) cut off")
            super().handle_exit(sig, frame)
            self.should_exit = self.force_exit = True
            return
        self._captured_signals.append(sig)  # uvicorn raises it again once it has stopped
        self.drain.begin()
        timeout = "no limit" if math.isinf(self.drain.timeout) else f"{self.drain.timeout:g} s"
        _say(f"{signal.Signals(sig).name}: draining {self.drain.in_flight} request(s) (timeout {timeout}); "
             "new requests get 503")

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if self.drain.done():
                self.should_exit = True
            elif self.drain.timed_out():
                _say(f"drain timeout: stopping with {self.drain.in_flight} request(s) unfinished")
                self.should_exit = self.force_exit = True
        return await super().on_tick(counter)
