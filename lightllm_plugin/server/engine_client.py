"""AsyncEngineClient: how code in the api process (native routes, adapters) runs a request.

It sends the request to the tokenizer processes, and a background task reading the
pipeline's output socket routes each token to the asyncio queue of the request it
belongs to. Nothing here waits on the model: every socket operation is asyncio.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from lightllm_plugin.engine.outputs import PoolingEvent
from lightllm_plugin.ipc import decode_or_drop
from lightllm_plugin.pooling_params import GENERATION_ROUTES, PoolerInfo
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.metrics import ServerMetrics
from lightllm_plugin.server.protocol import (
    AbortRequest,
    Addresses,
    ApiInbox,
    CacheFlushed,
    EngineStats,
    FlushCache,
    OutputBatch,
    PoolingBatch,
    RequestError,
    TokenizeRequest,
    TokenOutput,
    decoder_for,
    encoder,
)

logger = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The pipeline refused the request; `message` names the offending field."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds, sent as Retry-After (503 when overloaded)

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}


# samples of one request: each is an engine request of its own
MAX_SAMPLES = 128
# what an overloaded server asks a client to wait before retrying (the OpenAI SDK honours it)
RETRY_AFTER_S = 1
# the router answers a flush between two steps; a longer wait means it is stuck
FLUSH_TIMEOUT_S = 30.0


@dataclass
class _Group:
    """One client request: n samples, each an engine request of its own."""

    index_of: dict[int, int]  # engine request id -> sample index
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: set[int] = field(default_factory=set)
    # samples whose last token reached the api, whether or not the route has read it yet
    ended: set[int] = field(default_factory=set)
    last_token_time: dict[int, float] = field(default_factory=dict)


class AsyncEngineClient:
    def __init__(
        self,
        addresses: Addresses,
        metrics: ServerMetrics | None = None,
        *,
        max_queue_size: int | None = None,
        request_timeout: float | None = None,
        pooler: PoolerInfo | None = None,  # the served model has no sampler: pool() only
    ):
        self.addresses = addresses
        self.pooler = pooler
        self.metrics = metrics or ServerMetrics()
        self.max_queue_size = max_queue_size
        self.request_timeout = request_timeout
        # engine requests accepted here that have not had their first token yet: queued in the
        # tokenizer, waiting in the router, or in their prefill. --max_queue_size bounds them.
        self._waiting: set[int] = set()
        self.stats = EngineStats(0, 0, 0, 0)
        self._groups: dict[int, _Group] = {}
        self._ids = itertools.count()
        self._flushes: dict[int, asyncio.Future] = {}  # FlushCache id -> its answer's freed slots
        self._flush_ids = itertools.count()
        self._reader: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: str | None = None

    # ---- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._from_pipeline = self._socket(zmq.PULL, self.addresses.api, bind=True)
        self._to_tokenizer = self._socket(zmq.PUSH, self.addresses.tokenizer, bind=True)
        self._to_router = self._socket(zmq.PUSH, self.addresses.router, bind=False)
        self._loop = asyncio.get_running_loop()
        self._reader = asyncio.create_task(self._read_loop(), name="lightllm-plugin-output-reader")

    def _socket(self, kind: int, address: str, *, bind: bool) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address) if bind else sock.connect(address)
        return sock

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._ctx.destroy(linger=0)

    @property
    def alive(self) -> bool:
        return self._failure is None and self._reader is not None and not self._reader.done()

    def fail_all_threadsafe(self, message: str) -> None:
        """The pipeline is gone: end every request now (503) instead of leaving it waiting.
        Callable from any thread (the launcher's watchdog)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_all, message)

    def _fail_all(self, message: str) -> None:
        self._failure = message
        error = RequestError(req_ids=[], message=message, status=503)
        for group in {id(g): g for g in self._groups.values()}.values():
            group.queue.put_nowait(error)
        for answer in self._flushes.values():
            if not answer.done():
                answer.set_exception(RequestRejected(message, 503))

    # ---- requests --------------------------------------------------------------------
    async def generate(
        self,
        params: SamplingParams,
        *,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = True,
        field: str = "inputs",
        lower_max_new_tokens: bool = True,
        images: list[str] | None = None,
    ) -> AsyncIterator[tuple[int, TokenOutput]]:
        """Yield (sample index, token output) until all n samples finish.

        Raises RequestRejected before the first token if the input is refused. Closing the
        generator early (the client went away) aborts the unfinished samples, which frees
        their KV slots at once.
        """
        if self._failure is not None:
            raise RequestRejected(self._failure, 503)
        if self.pooler is not None:
            self.metrics.requests_rejected.inc(status="400")
            raise RequestRejected(
                f"this server serves {self.pooler.described()}, which does not "
                f"generate text; its routes: {self.pooler.routes()}", 400)
        if params.n > MAX_SAMPLES:
            self.metrics.requests_rejected.inc(status="400")
            raise RequestRejected(f"n must be <= {MAX_SAMPLES}, got {params.n}", 400)
        if self.max_queue_size is not None and len(self._waiting) >= self.max_queue_size:
            self.metrics.requests_rejected.inc(status="503")
            raise RequestRejected(
                f"the server is overloaded: {len(self._waiting)} requests are waiting to start "
                f"(max_queue_size={self.max_queue_size}); retry later",
                503,
                retry_after=RETRY_AFTER_S,
            )
        req_ids = [next(self._ids) for _ in range(params.n)]
        self._waiting.update(req_ids)
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        group = _Group(index_of={r: i for i, r in enumerate(req_ids)}, arrival=time.perf_counter())
        group.unfinished.update(req_ids)
        for req_id in req_ids:
            self._groups[req_id] = group
        request = TokenizeRequest(
            req_ids=req_ids,
            params=params,
            prompt=prompt,
            prompt_ids=prompt_ids,
            messages=messages,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
            add_special_tokens=add_special_tokens,
            field=field,
            lower_max_new_tokens=lower_max_new_tokens,
            images=images,
        )
        try:
            try:
                frame = encoder.encode(request)
            except OverflowError:  # a number no field check caught: refuse it, do not 500
                raise RequestRejected("a number in the request is out of range", 400) from None
            await self._to_tokenizer.send(frame)
            while group.unfinished:
                if deadline is None:
                    item = await group.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(group.queue.get(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        # the finally below aborts the unfinished samples, which frees their slots
                        self.metrics.requests_rejected.inc(status="504")
                        raise RequestRejected(
                            f"the request ran longer than request_timeout={self.request_timeout:g}s and was aborted",
                            504,
                        ) from None
                if isinstance(item, RequestError):
                    # refused samples hold nothing in the engine; only their siblings need aborting
                    group.unfinished -= set(item.req_ids) or set(group.unfinished)
                    if item.status < 500:
                        self.metrics.requests_rejected.inc(status=str(item.status))
                    raise RequestRejected(item.message, item.status)
                if item.finish_reason is not None:
                    group.unfinished.discard(item.req_id)
                yield group.index_of[item.req_id], item
        finally:
            self._waiting.difference_update(req_ids)
            for req_id in req_ids:
                self._groups.pop(req_id, None)
            # a sample whose last token arrived but was not read (its client left) has ended in
            # the engine already: aborting it would count it twice and leave a stale abort behind
            if group.unfinished - group.ended:
                self._abort(sorted(group.unfinished - group.ended))

    async def pool(
        self,
        *,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        text_pair: str | None = None,
        field: str = "input",
        add_special_tokens: bool = True,
    ) -> PoolingEvent:
        """One prompt through a pooling model: its vector (and token counts) once its prefill
        ended. RequestRejected as generate() raises it; cancelled (the client went away), the
        request is aborted and its KV slots freed."""
        if self._failure is not None:
            raise RequestRejected(self._failure, 503)
        if self.pooler is None:
            self.metrics.requests_rejected.inc(status="400")
            raise RequestRejected(
                f"this server serves a generation model (--task generate), which has no pooling output; its routes: "
                f"{GENERATION_ROUTES} (a pooling server: --task reward, embed, classify or score)", 400)
        if self.max_queue_size is not None and len(self._waiting) >= self.max_queue_size:
            self.metrics.requests_rejected.inc(status="503")
            raise RequestRejected(
                f"the server is overloaded: {len(self._waiting)} requests are waiting to start "
                f"(max_queue_size={self.max_queue_size}); retry later", 503, retry_after=RETRY_AFTER_S)
        req_id = next(self._ids)
        self._waiting.add(req_id)
        group = _Group(index_of={req_id: 0}, arrival=time.perf_counter())
        group.unfinished.add(req_id)
        self._groups[req_id] = group
        request = TokenizeRequest(
            req_ids=[req_id], params=SamplingParams(max_new_tokens=1), prompt=prompt, prompt_ids=prompt_ids,
            messages=messages, add_special_tokens=add_special_tokens, field=field, text_pair=text_pair,
        )
        try:
            try:
                frame = encoder.encode(request)
            except OverflowError:
                raise RequestRejected("a number in the request is out of range", 400) from None
            await self._to_tokenizer.send(frame)
            try:
                item = await asyncio.wait_for(group.queue.get(), self.request_timeout)
            except asyncio.TimeoutError:
                self.metrics.requests_rejected.inc(status="504")
                raise RequestRejected(
                    f"the request ran longer than request_timeout={self.request_timeout:g}s and was aborted", 504
                ) from None
            if isinstance(item, RequestError):
                group.unfinished.clear()
                if item.status < 500:
                    self.metrics.requests_rejected.inc(status=str(item.status))
                raise RequestRejected(item.message, item.status)
            return item
        finally:
            self._waiting.discard(req_id)
            self._groups.pop(req_id, None)
            if group.unfinished - group.ended:
                self._abort([req_id])

    async def pool_many(self, inputs: list[dict[str, Any]]) -> list[PoolingEvent]:
        """pool(**input) for each input at once (the engine batches them); the first refusal
        cancels the others, which aborts them."""
        tasks = [asyncio.ensure_future(self.pool(**kw)) for kw in inputs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def flush_cache(self, timeout: float = FLUSH_TIMEOUT_S) -> int:
        """Drop every prefix-cache entry no running request uses; the KV slots that freed.
        RequestRejected: 503 when the pipeline is gone, 504 when the router did not answer."""
        if self._failure is not None:
            raise RequestRejected(self._failure, 503)
        flush_id = next(self._flush_ids)
        answer = asyncio.get_running_loop().create_future()
        self._flushes[flush_id] = answer
        try:
            await self._to_router.send(encoder.encode(FlushCache(id=flush_id)))
            return await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            raise RequestRejected(f"the router did not answer the cache flush within {timeout:g}s", 504) from None
        finally:
            self._flushes.pop(flush_id, None)

    def _abort(self, req_ids: list[int]) -> None:
        # not awaited: this runs in generator clean-up, where the task may be cancelled; an
        # unbounded PUSH socket queues the frame at once
        try:
            self._to_router.send(encoder.encode(AbortRequest(req_ids=req_ids)))
        except (zmq.ZMQError, RuntimeError):  # shutting down (socket or loop closed): the router goes too
            return
        self.metrics.requests_finished.inc(len(req_ids), finish_reason="abort")

    # ---- the output reader -------------------------------------------------------------
    async def _read_loop(self) -> None:
        decoder = decoder_for(ApiInbox)
        while True:
            frame = await self._from_pipeline.recv()
            msg = decode_or_drop(decoder, frame, "api")
            if msg is None:
                continue
            if isinstance(msg, OutputBatch):
                now = time.perf_counter()
                for output in msg.outputs:
                    self._deliver(output, now)
            elif isinstance(msg, PoolingBatch):
                for pooled in msg.outputs:
                    self._deliver_pooled(pooled, time.perf_counter())
            elif isinstance(msg, EngineStats):
                self._record_stats(msg)
            elif isinstance(msg, CacheFlushed):
                answer = self._flushes.get(msg.id)
                if answer is not None and not answer.done():  # else: its caller gave up waiting
                    answer.set_result(msg.freed_slots)
            elif isinstance(msg, RequestError):
                for group in {id(g): g for r in msg.req_ids if (g := self._groups.get(r))}.values():
                    group.queue.put_nowait(msg)

    def _deliver(self, output: TokenOutput, now: float) -> None:
        self._waiting.discard(output.req_id)
        group = self._groups.get(output.req_id)
        if group is None:
            return  # aborted while this token was on its way
        m = self.metrics
        last = group.last_token_time.get(output.req_id)
        if last is None:
            m.time_to_first_token.observe(now - group.arrival)
            m.prompt_tokens.inc(output.prompt_len)
        else:
            m.inter_token_latency.observe(now - last)
        group.last_token_time[output.req_id] = now
        m.generation_tokens.inc()
        if output.finish_reason is not None:
            m.requests_finished.inc(finish_reason=output.finish_reason)
            group.ended.add(output.req_id)
        group.queue.put_nowait(output)

    def _deliver_pooled(self, pooled: PoolingEvent, now: float) -> None:
        self._waiting.discard(pooled.req_id)
        group = self._groups.get(pooled.req_id)
        if group is None:
            return  # aborted while its answer was on its way
        self.metrics.time_to_first_token.observe(now - group.arrival)
        self.metrics.prompt_tokens.inc(pooled.prompt_len)
        self.metrics.requests_finished.inc(finish_reason="stop")
        group.ended.add(pooled.req_id)
        group.queue.put_nowait(pooled)

    def _record_stats(self, stats: EngineStats) -> None:
        previous, self.stats = self.stats, stats
        m = self.metrics
        m.num_running.set(stats.num_running)
        m.num_waiting.set(stats.num_waiting)
        m.kv_slots_used.set(stats.used_slots)
        m.kv_slots_total.set(stats.total_slots)
        m.kv_slots_cached.set(stats.cached_slots)
        # the router's figures are cumulative: the counters grow by what each report adds
        m.prefix_cache_queries.inc(stats.cache_query_tokens - previous.cache_query_tokens)
        m.prefix_cache_hits.inc(stats.cache_hit_tokens - previous.cache_hit_tokens)
