"""EngineCore: the step loop. schedule -> plan slots -> run the worker -> stop checks.

Single-threaded and synchronous: the router process and the offline `LLM` both drive it
by calling `add_request` / `abort` / `step`. It is the one owner of KV-slot allocation
(a CPU free-list) and of request rows; the runner only executes plans.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.memory import SlotFreeList
from lightllm_plugin.engine.outputs import TokenEvent
from lightllm_plugin.engine.runner import ModelRunner, StepEntry
from lightllm_plugin.engine.sampling import PendingSample, SamplerRow, has_penalty
from lightllm_plugin.engine.scheduler import SchedRequest, Scheduler
from lightllm_plugin.engine.step_plan import PlanSender
from lightllm_plugin.models.loader import InMemoryCheckpoint
from lightllm_plugin.models.tensor_parallel import TPGroup
from lightllm_plugin.sampling_params import SamplingParams


@dataclass
class _LiveRequest:
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sched: SchedRequest
    sampler: SamplerRow
    stop_ids: frozenset[int]
    row: int = -1
    slots: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


@dataclass
class _LaunchedStep:
    """A step on the device whose sampled tokens the host has not read yet."""

    order: list[_LiveRequest]  # one per row of the step
    pending: PendingSample


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        progress: bool = True,
        with_tokenizer: bool = True,
        checkpoint: InMemoryCheckpoint | None = None,  # weights in memory instead of config.model_dir
        tp_group: TPGroup | None = None,  # config.tp > 1: rank 0's group, and the other ranks' plan sockets
        plan_sender: PlanSender | None = None,
    ):
        from lightllm_plugin.models.tokenizer import load_tokenizer, resolve_model_path

        self.config = config
        if checkpoint is not None:
            if with_tokenizer:
                raise ValueError("an in-memory checkpoint has no tokenizer: pass with_tokenizer=False")
            kind, path = "memory", "<in-memory>"
        else:
            kind, path = resolve_model_path(config.model_dir)
        config.resolved_model_path = path
        # the model first: an unsupported architecture is reported before any tokenizer work
        self.runner = ModelRunner(config, kind, path, progress=progress, checkpoint=checkpoint, tp_group=tp_group,
                                  plan_sender=plan_sender)
        self.tokenizer = (
            load_tokenizer(path, config.tokenizer_mode, config.trust_remote_code) if with_tokenizer else None
        )
        self.model_cfg = self.runner.model_cfg
        config.resolved_eos_ids = self._eos_ids()

        total = self.runner.size_kv_pool()
        config.total_slots = total
        if total < config.max_req_total_len:
            raise ValueError(
                f"the KV pool holds {total} tokens, fewer than max_req_total_len={config.max_req_total_len}: "
                f"raise max_total_token_num / mem_fraction or lower max_req_total_len"
            )
        self.free_slots = SlotFreeList(total)
        self.scheduler = Scheduler(total, config.batch_max_tokens, config.running_max_req_size)
        self._live: dict[int, _LiveRequest] = {}
        self._auto_ids = itertools.count(1 << 40)
        self._queued: _LaunchedStep | None = None  # a decode step queued ahead of the host
        self.steps_queued_ahead = 0

    def _eos_ids(self) -> list[int]:
        ids = list(self.model_cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        ids.extend(self.config.eos_id or [])
        return sorted(set(ids))

    # ---- status -----------------------------------------------------------------------
    @property
    def total_slots(self) -> int:
        return self.free_slots.total_slots

    @property
    def used_slots(self) -> int:
        return self.free_slots.num_used

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def tokens_held(self) -> int:
        """KV tokens that live requests hold; always equals used_slots (zero waste)."""
        return sum(len(r.slots) for r in self._live.values())

    def new_request_id(self) -> int:
        return next(self._auto_ids)

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem; called before anything is allocated."""
        cfg = self.config
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) > cfg.max_req_input_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, more than max_req_input_len={cfg.max_req_input_len}"
            )
        if len(prompt_ids) + params.max_new_tokens > cfg.max_req_total_len:
            raise ValueError(
                f"prompt tokens ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) exceed "
                f"max_req_total_len={cfg.max_req_total_len}"
            )
        vocab = self.model_cfg.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if params.n != 1:
            raise ValueError("EngineCore takes n=1 requests; expand n into separate requests")

    def add_request(self, req_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        if req_id in self._live:
            raise ValueError(f"request id {req_id} is already in use")
        prompt_ids = [int(t) for t in prompt_ids]
        self.validate(prompt_ids, params)
        generator = self.runner.add_generator(req_id, params.seed) if params.seed is not None else None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.config.resolved_eos_ids)
        sched = SchedRequest(req_id=req_id, prompt_len=len(prompt_ids), max_new_tokens=params.max_new_tokens)
        sampler = SamplerRow(params, prompt_ids, [], generator, [])
        live = _LiveRequest(req_id, prompt_ids, params, sched, sampler, frozenset(stop_ids))
        live.sampler.output_ids = live.output_ids
        self.scheduler.add(sched)
        self._live[req_id] = live

    def abort(self, req_id: int) -> bool:
        """Drop a request now; its KV slots return to the free-list at once."""
        live = self._live.pop(req_id, None)
        if live is None:
            return False
        self._release(live)
        return True

    def finish(self, req_id: int) -> bool:
        """The detokenizer matched a stop string: same release as abort."""
        return self.abort(req_id)

    def _release(self, live: _LiveRequest) -> None:
        self.scheduler.remove(live.req_id)
        self.free_slots.free(live.slots)
        live.slots = []
        if live.row >= 0:
            self.runner.req_table.free_row(live.row)
            live.row = -1
        self.runner.drop_request(live.req_id)

    def fail_running(self) -> list[int]:
        """After step() raised: drop every request of the running batch (the step's requests),
        freeing their slots and rows, and forget any queued step. Waiting requests stay."""
        self._queued = None
        failed = [r.req_id for r in self.scheduler.running]
        for req_id in failed:
            self.abort(req_id)
        return failed

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Run one step and return its events.

        On the CUDA-graph path a decode step is queued before the previous one is read back, its
        input ids taken from the tokens still on the device: the GPU never waits for the host's
        bookkeeping. A request that turns out to have finished (eos) in the step read back had
        one token too many computed in the queued step; that token is dropped, and its KV slot
        freed with the others.
        """
        launched, self._queued = self._queued, None
        if launched is None:
            batch = self.scheduler.schedule()
            if batch.is_empty():
                return []
            launched = self._launch_scheduled(batch)
        self._queued = self._queue_next_decode(launched)
        return self._read_back(launched)

    def _launch_scheduled(self, batch) -> _LaunchedStep:
        entries: list[StepEntry] = []
        order: list[_LiveRequest] = []
        for sched in batch.decode:
            live = self._live[sched.req_id]
            entries.append(self._decode_entry(live, len(live.output_ids), live.output_ids[-1]))
            order.append(live)
        for sched in batch.prefill:
            live = self._live[sched.req_id]
            live.row = self.runner.req_table.alloc_row()
            slots = self.free_slots.allocate(len(live.prompt_ids))
            entries.append(StepEntry(live.row, live.prompt_ids, 0, slots, live.sampler))
            live.slots.extend(slots)
            order.append(live)
        for live in order:
            live.sampler.blocked_ids = self._blocked_ids(live, len(live.output_ids))
        return _LaunchedStep(order, self.runner.launch(entries))

    def _decode_entry(self, live: _LiveRequest, output_len: int, token: int) -> StepEntry:
        """Feed back output token number `output_len` (1-based) into one new KV slot."""
        slots = self.free_slots.allocate(1)
        live.slots.extend(slots)
        return StepEntry(live.row, [token], len(live.prompt_ids) + output_len - 1, slots, live.sampler)

    def _blocked_ids(self, live: _LiveRequest, output_len: int) -> list[int]:
        return sorted(live.stop_ids) if output_len < live.params.min_new_tokens else []

    def _queue_next_decode(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Queue the decode step that follows `launched` while it still runs, when the host
        already knows that step's batch: nobody waiting to be admitted (the scheduler would
        give exactly the running requests), no penalties (they read the output ids), and a
        CUDA-graph step. Requests that reach max_new_tokens in `launched` are left out."""
        if self.scheduler.num_waiting:
            return None
        alive = [(i, live) for i, live in enumerate(launched.order) if self._live.get(live.req_id) is live]
        if len(alive) != self.scheduler.num_running:
            return None  # some running request is not in this step
        rows: list[int] = []
        order: list[_LiveRequest] = []
        for i, live in alive:
            output_len = len(live.output_ids) + 1  # with the token still on the device
            if output_len >= live.params.max_new_tokens:
                continue
            if has_penalty(live.params):
                return None
            rows.append(i)
            order.append(live)
        if not order or not self.runner.can_chain(len(order)):
            return None
        entries = []
        for live in order:
            output_len = len(live.output_ids) + 1
            live.sampler.blocked_ids = self._blocked_ids(live, output_len)
            entries.append(self._decode_entry(live, output_len, 0))  # the token comes from the device
        tokens = launched.pending.tokens
        if len(rows) != len(launched.order):
            tokens = tokens[torch.tensor(rows, dtype=torch.long, pin_memory=True).to(tokens.device, non_blocking=True)]
        self.steps_queued_ahead += 1
        return _LaunchedStep(order, self.runner.launch(entries, chained_ids=tokens))

    def _read_back(self, launched: _LaunchedStep) -> list[TokenEvent]:
        result = launched.pending.result()
        events = []
        for i, live in enumerate(launched.order):
            if self._live.get(live.req_id) is not live:
                continue  # finished or aborted after this step was queued: its token is dropped
            token = result.token_ids[i]
            live.output_ids.append(token)
            live.sched.output_len = len(live.output_ids)
            reason = self._finish_reason(live, token)
            events.append(
                TokenEvent(
                    req_id=live.req_id,
                    token_id=token,
                    logprob=result.logprobs[i] if result.logprobs is not None and live.params.logprobs is not None else None,
                    top_logprobs=result.top_logprobs[i] if result.top_logprobs is not None and live.params.logprobs else None,
                    finish_reason=reason,
                    output_len=len(live.output_ids),
                    prompt_len=len(live.prompt_ids),
                )
            )
            if reason is not None:
                del self._live[live.req_id]
                self._release(live)
        return events

    def _finish_reason(self, live: _LiveRequest, token: int) -> str | None:
        n_out = len(live.output_ids)
        if token in live.stop_ids and n_out >= live.params.min_new_tokens:
            return "stop"
        if n_out >= live.params.max_new_tokens:
            return "length"
        return None
