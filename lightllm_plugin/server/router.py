"""The router process: owns the EngineCore (model, KV slots, scheduler) and steps it.

Loop: take every queued add/abort/finish without waiting, run one step while anything is
unfinished, otherwise sleep in poll until a message comes. Token events go to the
detokenizer, one message per step; load figures go straight to the api.
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from lightllm_plugin import ipc
from lightllm_plugin.config import EngineConfig
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server import child_process
from lightllm_plugin.server.protocol import (
    AbortRequest,
    AddRequest,
    Addresses,
    CacheFlushed,
    DetokenizeForget,
    DetokenizeStart,
    EngineStats,
    FinishRequest,
    FlushCache,
    PoolingBatch,
    Ready,
    RequestError,
    RouterInbox,
    TokenBatch,
    decoder_for,
    encoder,
)
from lightllm_plugin.text_stream import PROMPT_CONTEXT_TOKENS

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1  # at most this often while busy; always once on going idle
IDLE_POLL_MS = 500  # how often an idle router checks its parent
# an abort may overtake its own add (the add is still in the tokenizer); remember it this long
EARLY_ABORT_TTL_S = 60.0


class Router:
    def __init__(self, core, to_detokenizer: zmq.Socket, to_api: zmq.Socket):
        self.core = core
        self.to_detokenizer = to_detokenizer
        self.to_api = to_api
        self.early_aborts: dict[int, float] = {}
        self._last_stats: EngineStats | None = None
        self._last_stats_time = 0.0

    # ---- inbox ---------------------------------------------------------------------
    def handle(self, msg) -> None:
        if isinstance(msg, AddRequest):
            self._add(msg)
        elif isinstance(msg, AbortRequest):
            aborted = [r for r in msg.req_ids if self.core.abort(r)]
            now = time.monotonic()
            for req_id in set(msg.req_ids) - set(aborted):
                self.early_aborts[req_id] = now
            if aborted:
                self.to_detokenizer.send(encoder.encode(DetokenizeForget(req_ids=aborted)))
        elif isinstance(msg, FinishRequest):
            self.core.finish(msg.req_id)
        elif isinstance(msg, FlushCache):
            self._flush_cache(msg)

    def handle_safely(self, msg) -> None:
        """One message whose handling fails (a hostile or buggy peer) must not stop the router."""
        try:
            self.handle(msg)
        except Exception as exc:
            logger.exception("dropped a %s the router could not handle", type(msg).__name__)
            if isinstance(msg, AddRequest):
                self.core.abort(msg.req_id)
                error = RequestError(req_ids=[msg.req_id], message=f"the request could not be started: {exc}", status=500)
                self.to_api.send(encoder.encode(error))

    def _add(self, msg: AddRequest) -> None:
        if self.early_aborts.pop(msg.req_id, None) is not None:
            return
        try:
            self.core.add_request(msg.req_id, msg.prompt_ids, msg.params, msg.images)
        except ValueError as exc:
            self.to_api.send(encoder.encode(RequestError(req_ids=[msg.req_id], message=str(exc))))
            return
        if self.core.pooler is not None:
            return  # a pooling request's answer goes straight to the api: no text to render
        start = DetokenizeStart(
            req_id=msg.req_id,
            prompt_tail=msg.prompt_ids[-PROMPT_CONTEXT_TOKENS:],
            stop=msg.params.stop,
            skip_special_tokens=msg.params.skip_special_tokens,
        )
        self.to_detokenizer.send(encoder.encode(start))
        self.report_failed()

    def report_failed(self) -> None:
        """Requests the engine ended on its own (a grammar that did not compile) go back to their
        clients as errors at once, and the detokenizer forgets them."""
        failed = self.core.take_failed()
        if not failed:
            return
        self.to_detokenizer.send(encoder.encode(DetokenizeForget(req_ids=[req_id for req_id, _ in failed])))
        for req_id, message in failed:
            self.to_api.send(encoder.encode(RequestError(req_ids=[req_id], message=message)))

    def _flush_cache(self, msg: FlushCache) -> None:
        freed = self.core.flush_cache()
        # the figures first: on the one socket they reach the api before the answer does, so a
        # client that reads the metrics after its flush returned sees the emptied cache
        self.report_stats(force=True)
        self.to_api.send(encoder.encode(CacheFlushed(id=msg.id, freed_slots=freed)))

    def expire_early_aborts(self) -> None:
        if not self.early_aborts:
            return
        cutoff = time.monotonic() - EARLY_ABORT_TTL_S
        for req_id in [r for r, t in self.early_aborts.items() if t < cutoff]:
            del self.early_aborts[req_id]

    # ---- the loop ----------------------------------------------------------------------
    def run(self, inbox: zmq.Socket, parent_pid: int) -> None:
        core = self.core
        decoder = decoder_for(RouterInbox)
        self.report_stats(force=True)
        while child_process.parent_alive(parent_pid):
            # busy: take what is queued without waiting; idle: sleep until a message comes
            if core.has_unfinished() or inbox.poll(IDLE_POLL_MS):
                for msg in ipc.drain(inbox, decoder, "router"):
                    self.handle_safely(msg)
            if core.has_unfinished():
                self.step()
                self.report_stats()
            else:
                self.report_stats(force=True)
                self.expire_early_aborts()

    # ---- stepping --------------------------------------------------------------------
    def step(self) -> None:
        try:
            events = self.core.step()
        except Exception as exc:  # the model worker failed: fail this step's requests, keep serving
            failed = self.core.fail_running()
            logger.exception("a step failed; failing its %d requests", len(failed))
            if failed:
                self.to_detokenizer.send(encoder.encode(DetokenizeForget(req_ids=failed)))
                message = f"the model failed while running this request ({type(exc).__name__})"
                self.to_api.send(encoder.encode(RequestError(req_ids=failed, message=message, status=500)))
            if self.core.config.tp > 1:
                # the other ranks may be inside this step's collectives waiting for this one: the
                # group is out of step for good, so the router ends and the server with it
                logger.critical("a failed step leaves the %d tensor-parallel ranks out of step; stopping",
                                self.core.config.tp)
                raise
            return
        if events and self.core.pooler is not None:
            self.to_api.send(encoder.encode(PoolingBatch(outputs=events)))
        elif events:
            self.to_detokenizer.send(encoder.encode(TokenBatch(events=events)))
        self.report_failed()

    def report_stats(self, force: bool = False) -> None:
        core = self.core
        stats = EngineStats(
            core.num_running,
            core.num_waiting,
            self._slots_in_use(),
            core.total_slots,
            cache_query_tokens=core.cache_query_tokens,
            cache_hit_tokens=core.cache_hit_tokens,
            cached_slots=core.cached_slots,
        )
        now = time.monotonic()
        if stats == self._last_stats or (not force and now - self._last_stats_time < STATS_INTERVAL_S):
            return
        self.to_api.send(encoder.encode(stats))
        self._last_stats, self._last_stats_time = stats, now

    def _slots_in_use(self) -> int:
        """Slots a new request cannot have. Cache entries no live request uses are evicted on
        demand, so they count as free, as admission counts them: an idle server reads 0 whatever
        its cache holds (the cache's own figure is cached_slots)."""
        cache = self.core.prefix_cache
        return self.core.used_slots - (cache.evictable_slots if cache is not None else 0)


def warm_up(core) -> None:
    """One tiny request through prefill and decode, so the first client does not pay for
    lazy initialisation (allocator growth, kernel selection)."""
    req_id = -1
    core.add_request(req_id, list(range(10, 18)), SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))
    while core.has_unfinished():
        core.step()
    # the warm-up is no traffic: no client should hit its tokens, or find them in the figures
    core.flush_cache()
    core.cache_query_tokens = core.cache_hit_tokens = 0


def run_router(config: EngineConfig, addresses: Addresses, parent_pid: int) -> None:
    """Process entry point."""
    child_process.bootstrap("router", parent_pid)
    # The api, tokenizer and detokenizer processes share the CPU with this one: OpenMP's spin
    # is bounded by the package (lightllm_plugin/__init__.py), before torch loads.
    from lightllm_plugin.engine.core import (
        EngineCore,  # torch is heavy: import in the child only
    )

    # a context left with open sockets would block the exit once the parent is gone
    with ipc.zmq_context() as ctx:
        inbox = ipc.open_socket(ctx, zmq.PULL, addresses.router, bind=True)
        to_detokenizer = ipc.open_socket(ctx, zmq.PUSH, addresses.detokenizer, bind=False)
        to_api = ipc.open_socket(ctx, zmq.PUSH, addresses.api, bind=False)
        control = ipc.open_socket(ctx, zmq.PUSH, addresses.control, bind=False)

        # with its tokenizer, as the offline LLM does: the tokenizer's eos id joins the stop ids
        if config.tp > 1:
            from lightllm_plugin.engine.tp_worker import join_as_rank_zero

            # rank 0 of the tensor-parallel group: waits here until every other rank has joined
            group, sender = join_as_rank_zero(config, addresses.run_dir)
            core = EngineCore(config, progress=True, tp_group=group, plan_sender=sender)
        else:
            core = EngineCore(config, progress=True)
        warm_up(core)
        control.send(
            encoder.encode(
                Ready(
                    role="router",
                    pid=os.getpid(),
                    total_slots=core.total_slots,
                    eos_ids=list(config.resolved_eos_ids),
                    model_path=config.resolved_model_path,
                    dtype=config.resolved_dtype,
                    device=config.resolved_device,
                    max_req_total_len=config.max_req_total_len,
                    max_req_input_len=config.max_req_input_len,
                    task=config.resolved_task,
                    pooler=config.pooler,
                )
            )
        )
        router = Router(core, to_detokenizer, to_api)
        router.run(inbox, parent_pid)
