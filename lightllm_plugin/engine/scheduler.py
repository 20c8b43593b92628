"""Request admission for token-level KV allocation (LightLLM's router rule).

Pure Python on purpose: the policy is a function of token counts alone, so it is
unit-tested without torch or a GPU.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["SchedRequest", "ScheduledBatch", "Scheduler", "peak_token_need"]


@dataclass
class SchedRequest:
    req_id: int
    prompt_len: int
    max_new_tokens: int
    output_len: int = 0
    arrival: int = 0

    @property
    def held_tokens(self) -> int:
        return self.prompt_len + self.output_len

    @property
    def remaining_tokens(self) -> int:
        # Clamped so a request the core has not yet removed never lowers the peak.
        return max(self.max_new_tokens - self.output_len, 0)


@dataclass
class ScheduledBatch:
    prefill: list[SchedRequest] = field(default_factory=list)
    decode: list[SchedRequest] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.prompt_len for r in self.prefill) + len(self.decode)

    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


def _peak_of_sorted(pairs: list[tuple[int, int]]) -> int:
    """pairs are (-b, a), i.e. sorted by b descending."""
    peak = 0
    held = 0
    for i, (neg_b, a) in enumerate(pairs):
        held += a
        peak = max(peak, -neg_b * (i + 1) + held)
    return peak


def peak_token_need(requests: Iterable[SchedRequest]) -> int:
    # No OOM: each request holds at most a_i + b_i, and when request i (b sorted desc) finishes only 0..i are alive.
    return _peak_of_sorted(sorted((-r.remaining_tokens, r.held_tokens) for r in requests))


class Scheduler:
    peak_token_need = staticmethod(peak_token_need)

    def __init__(self, total_slots: int, batch_max_tokens: int, running_max_req_size: int):
        if total_slots < 1 or batch_max_tokens < 1 or running_max_req_size < 1:
            raise ValueError(
                "total_slots, batch_max_tokens and running_max_req_size must all be >= 1, got "
                f"{total_slots}, {batch_max_tokens}, {running_max_req_size}"
            )
        self.total_slots = total_slots
        self.batch_max_tokens = batch_max_tokens
        self.running_max_req_size = running_max_req_size
        self._waiting: deque[SchedRequest] = deque()
        self._running: dict[int, SchedRequest] = {}
        self._known: set[int] = set()
        self._arrivals = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> tuple[SchedRequest, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[SchedRequest, ...]:
        return tuple(self._running.values())

    def add(self, req: SchedRequest) -> None:
        if req.req_id in self._known:
            raise ValueError(f"duplicate req_id {req.req_id}")
        # max_new_tokens >= 1 because an admitted request always runs at least one step,
        # which the peak bound must already include.
        if req.prompt_len < 1 or req.max_new_tokens < 1:
            raise ValueError(
                f"request {req.req_id}: prompt_len and max_new_tokens must be >= 1, "
                f"got {req.prompt_len} and {req.max_new_tokens}"
            )
        # Both checks stop a head-of-line request that could never be admitted from
        # blocking the FCFS queue forever.
        if req.prompt_len > self.batch_max_tokens:
            raise ValueError(
                f"request {req.req_id}: prompt_len {req.prompt_len} exceeds "
                f"batch_max_tokens {self.batch_max_tokens}"
            )
        if req.prompt_len + req.max_new_tokens > self.total_slots:
            raise ValueError(
                f"request {req.req_id}: prompt_len + max_new_tokens = "
                f"{req.prompt_len + req.max_new_tokens} exceeds total_slots {self.total_slots}"
            )
        req.arrival = next(self._arrivals)
        self._known.add(req.req_id)
        self._waiting.append(req)

    def remove(self, req_id: int) -> SchedRequest | None:
        if req_id not in self._known:
            return None
        self._known.discard(req_id)
        req = self._running.pop(req_id, None)
        if req is not None:
            return req
        for i, r in enumerate(self._waiting):
            if r.req_id == req_id:
                del self._waiting[i]
                return r
        raise AssertionError(f"req_id {req_id} known but neither waiting nor running")

    def schedule(self) -> ScheduledBatch:
        decode = list(self._running.values())
        prefill: list[SchedRequest] = []
        pairs = sorted((-r.remaining_tokens, r.held_tokens) for r in decode)
        tokens = len(decode)
        while self._waiting:
            cand = self._waiting[0]
            if len(self._running) + 1 > self.running_max_req_size:
                break
            if tokens + cand.prompt_len > self.batch_max_tokens:
                break
            pair = (-cand.remaining_tokens, cand.held_tokens)
            trial = pairs.copy()
            bisect.insort(trial, pair)
            if _peak_of_sorted(trial) > self.total_slots:
                break
            pairs = trial
            tokens += cand.prompt_len
            self._waiting.popleft()
            self._running[cand.req_id] = cand
            prefill.append(cand)
        return ScheduledBatch(prefill=prefill, decode=decode)
