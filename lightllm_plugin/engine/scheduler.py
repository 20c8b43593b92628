"""Request admission for token-level KV allocation (LightLLM's router rule).

Pure Python on purpose: the policy is a function of token counts alone, so it is
unit-tested without torch or a GPU.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Iterable

from lightllm_plugin.engine.prefix_cache import CacheNode, PrefixCache

__all__ = ["SchedRequest", "ScheduledBatch", "Scheduler", "peak_token_need"]


@dataclass
class SchedRequest:
    req_id: int
    prompt_len: int
    max_new_tokens: int
    output_len: int = 0
    arrival: int = 0
    prompt_ids: list[int] | None = None  # needed only with a prefix cache
    salt: str | None = None
    # prompt positions whose KV exists or is in this step: cached ones plus the chunks scheduled
    prefilled_len: int = 0
    # prompt positions whose slots the prefix cache owns: the cached prefix at admission, the whole
    # prompt once its last chunk has run and it was inserted
    shared_len: int = 0
    cached_len: int = 0  # prompt tokens taken from the cache at admission
    cache_node: CacheNode | None = None  # the node this request locks
    chunk_start: int = 0  # this step's prefill chunk: prompt positions [start, start + len)
    chunk_len: int = 0

    @property
    def prefill_done(self) -> bool:
        return self.prefilled_len >= self.prompt_len

    @property
    def held_tokens(self) -> int:
        """Slots this request holds, or will once its prompt is prefilled, that the cache does not
        own. A prompt's chunks count as held from admission: they arrive faster than one token a
        step, which the peak rule's lockstep growth assumes of the remaining tokens."""
        return self.prompt_len - self.shared_len + self.output_len

    @property
    def remaining_tokens(self) -> int:
        # Clamped so a request the core has not yet removed never lowers the peak.
        return max(self.max_new_tokens - self.output_len, 0)


@dataclass
class ScheduledBatch:
    # each with this step's chunk_start / chunk_len; a chunk that ends its prompt samples
    prefill: list[SchedRequest] = field(default_factory=list)
    decode: list[SchedRequest] = field(default_factory=list)
    admitted: list[SchedRequest] = field(default_factory=list)  # those of prefill new this step

    @property
    def num_tokens(self) -> int:
        return sum(r.chunk_len for r in self.prefill) + len(self.decode)

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


# A request that shares at least this many more prompt tokens (or the rest of its prompt, when
# fewer remain) with a prompt still being prefilled than with the cache waits for that prefill:
# a step later it reads them from the cache instead of computing them a second time.
SHARED_PREFILL_WAIT_TOKENS = 16


class Scheduler:
    peak_token_need = staticmethod(peak_token_need)

    def __init__(
        self,
        total_slots: int,
        batch_max_tokens: int,
        running_max_req_size: int,
        chunked_prefill_size: int | None = None,  # None: a prompt is prefilled in one step
        cache: PrefixCache | None = None,
    ):
        if total_slots < 1 or batch_max_tokens < 1 or running_max_req_size < 1:
            raise ValueError(
                "total_slots, batch_max_tokens and running_max_req_size must all be >= 1, got "
                f"{total_slots}, {batch_max_tokens}, {running_max_req_size}"
            )
        if chunked_prefill_size is not None and chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1, got {chunked_prefill_size}")
        self.total_slots = total_slots
        self.batch_max_tokens = batch_max_tokens
        self.running_max_req_size = running_max_req_size
        self.chunked_prefill_size = chunked_prefill_size
        self.cache = cache
        self._waiting: list[SchedRequest] = []
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

    def all_prefilled(self) -> bool:
        return all(r.prefill_done for r in self._running.values())

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
        if self.cache is not None and (req.prompt_ids is None or len(req.prompt_ids) != req.prompt_len):
            raise ValueError(f"request {req.req_id}: a prefix cache needs the prompt's token ids")
        # Both checks stop a head-of-line request that could never be admitted from
        # blocking the FCFS queue forever.
        if self.chunked_prefill_size is None and req.prompt_len > self.batch_max_tokens:
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
        """Forget a request. A running one keeps its cache lock: the caller unlocks it once it
        has given the request's tokens to the cache."""
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

    def _locked_slots(self) -> int:
        return self.cache.locked_slots if self.cache is not None else 0

    def schedule(self) -> ScheduledBatch:
        """This step: every prefilled request decodes one token, prompts being prefilled get
        their next chunk, then waiting requests are admitted first come first served while the
        peak KV need, the step's token budget and running_max_req_size allow. An admitted request's
        cached prefix is matched and locked here."""
        batch = ScheduledBatch()
        for r in self._running.values():
            r.chunk_len = 0
            if r.prefill_done:
                batch.decode.append(r)
        budget = self.batch_max_tokens - len(batch.decode)
        # A prompt longer than a chunk takes one chunk a step, so a long prompt adds at most a
        # chunk's time to the decodes' steps; shorter prompts go whole, as many as the batch
        # holds (a step cap instead of a per-prompt one would spread a burst of short prompts
        # over many steps). With nothing decoding, a prompt's first token comes soonest from one
        # step as large as the batch allows.
        chunk = self.chunked_prefill_size if self.chunked_prefill_size and batch.decode else budget
        for r in sorted((r for r in self._running.values() if not r.prefill_done), key=lambda r: r.arrival):
            n = min(budget, chunk, r.prompt_len - r.prefilled_len)
            if n <= 0:
                break
            self._take_chunk(batch, r, n)
            budget -= n
        # The peak rule assumes every request gains one token a step and is gone once its
        # remaining tokens are out; a prompt still in chunks after this step produces nothing for
        # as long as it waits for budget, so it is reserved whole (all it can ever hold) instead.
        # Its move into the rule when its prefill ends never raises the total.
        pairs = sorted((-r.remaining_tokens, r.held_tokens) for r in self._running.values() if r.prefill_done)
        reserved = sum(r.held_tokens + r.remaining_tokens for r in self._running.values() if not r.prefill_done)
        i = 0
        while i < len(self._waiting):
            cand = self._waiting[i]
            room = min(budget, chunk)
            if len(self._running) + 1 > self.running_max_req_size or budget <= 0:
                break
            node = None
            cached = 0
            if self.cache is not None:
                # the last prompt token is always computed: its logits give the first output token
                node = self.cache.match(cand.prompt_ids[: cand.prompt_len - 1], cand.salt)
                cached = node.depth
                if self._shares_a_running_prefill(cand, cached):
                    i += 1
                    continue
            new_tokens = cand.prompt_len - cached
            if self.chunked_prefill_size is None and new_tokens > room:
                break
            newly_locked = self.cache.unlocked_slots_above(node) if node is not None else 0
            n = min(room, new_tokens)
            trial, trial_reserved = pairs, reserved
            if n == new_tokens:
                trial = pairs.copy()
                bisect.insort(trial, (-cand.max_new_tokens, new_tokens))
            else:
                trial_reserved += new_tokens + cand.max_new_tokens
            if self._locked_slots() + newly_locked + trial_reserved + _peak_of_sorted(trial) > self.total_slots:
                break
            pairs, reserved = trial, trial_reserved
            del self._waiting[i]
            if node is not None:
                self.cache.lock(node)
            cand.cache_node = node
            cand.cached_len = cand.shared_len = cand.prefilled_len = cached
            self._running[cand.req_id] = cand
            batch.admitted.append(cand)
            self._take_chunk(batch, cand, n)
            budget -= n
        return batch

    @staticmethod
    def _take_chunk(batch: ScheduledBatch, r: SchedRequest, n: int) -> None:
        r.chunk_start, r.chunk_len = r.prefilled_len, n
        r.prefilled_len += n
        batch.prefill.append(r)

    def _shares_a_running_prefill(self, cand: SchedRequest, cached: int) -> bool:
        """Whether a prompt still being prefilled (its tokens not in the cache yet) holds enough
        more of cand's prompt than the cache does that cand should wait for it."""
        usable = cand.prompt_len - 1
        want = min(SHARED_PREFILL_WAIT_TOKENS, usable - cached)
        if want <= 0:
            return False
        end = cached + want
        head = cand.prompt_ids[:end]
        for r in self._running.values():
            if r.shared_len < r.prompt_len and r.salt == cand.salt and r.prompt_len >= end \
                    and r.prompt_ids[:end] == head:
                return True
        return False
