"""EngineCore: the step loop. schedule -> plan slots -> run the worker -> stop checks.

Single-threaded and synchronous: the router process and the offline `LLM` both drive it
by calling `add_request` / `abort` / `step`. It is the one owner of KV-slot allocation
(a CPU free-list and the prefix cache) and of request rows; the runner only executes plans.

A slot is free, owned by the prefix cache, or private to one live request; so
used slots == the cache's slots + the private slots of live requests, after every step.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.image_cache import ImageEmbeddingCache
from lightllm_plugin.engine.memory import SlotFreeList
from lightllm_plugin.engine.multimodal import MultimodalPrompt, build_prompt, check_images
from lightllm_plugin.engine.outputs import PoolingEvent, TokenEvent
from lightllm_plugin.engine.prefix_cache import PrefixCache
from lightllm_plugin.engine.runner import ModelRunner, StepEntry, TableWrites
from lightllm_plugin.engine.sampling import DeferredSample, PendingSample, SamplerRow, has_penalty
from lightllm_plugin.engine.scheduler import SchedRequest, Scheduler
from lightllm_plugin.engine.step_plan import PlanSender
from lightllm_plugin.engine.structured_output import AllowedTokens, GrammarCompiler, accept_tokens
from lightllm_plugin.images import ImageData
from lightllm_plugin.models.loader import InMemoryCheckpoint
from lightllm_plugin.models.tensor_parallel import TPGroup
from lightllm_plugin.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


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
    pooled_sum: torch.Tensor | None = None  # mean pooling: the hidden states of the chunks so far
    grammar_pending: Future | None = None  # its grammar, still compiling: not scheduled yet
    mm: MultimodalPrompt | None = None  # its images
    cache_ids: list[int] | None = None  # the prefix cache's key of the prompt (image tokens by image hash)


# image embeddings kept on the model's device for images sent again (engine/image_cache.py)
_IMAGE_CACHE_BYTES = 256 * 1024 * 1024
# how long a step with nothing else to run waits for a compiling grammar before it returns
_GRAMMAR_WAIT_S = 0.01


@dataclass
class _LaunchedStep:
    """A step on the device whose sampled tokens the host has not read yet."""

    order: list[_LiveRequest]  # one per sampled row of the step
    pending: PendingSample | None  # None: nothing sampled (only prompt chunks that are not their last)
    # queued ahead with a grammar in the batch: the forward only; sampled once the host has the tokens before
    deferred: DeferredSample | None = None


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
        self.pooler = self.runner.pooler  # None: a generation model
        # mean pooling reads every prompt token's hidden state, which a cached prefix does not have
        mean_pooling = self.pooler is not None and self.pooler.pooling == "mean"
        self.prefix_cache = None if config.disable_dynamic_prompt_cache or mean_pooling else PrefixCache()
        chunk = None if config.disable_chunked_prefill else config.chunked_prefill_size
        self.scheduler = Scheduler(total, config.batch_max_tokens, config.running_max_req_size, chunk,
                                   self.prefix_cache)
        # req_to_token entries the next launched step writes first (cached prefixes, adopted slots)
        self._table_writes: list[tuple[int, int, int]] = []
        self.cache_query_tokens = 0  # prompt tokens of admitted requests, with the cache on
        self.cache_hit_tokens = 0  # of those, the ones read from the cache
        self._live: dict[int, _LiveRequest] = {}
        self._auto_ids = itertools.count(1 << 40)
        # decode steps on the device ahead of the host, oldest first: one, or under a grammar two (the
        # second's sampling waits for the first's tokens)
        self._ahead: list[_LaunchedStep] = []
        self.steps_queued_ahead = 0
        self._grammar_compiler: GrammarCompiler | None = None  # built at the first constrained request
        self._compiling: dict[int, _LiveRequest] = {}  # requests whose grammar is not compiled yet
        self._failed: list[tuple[int, str]] = []  # ended by the engine, not reported yet (take_failed)
        self.image_cache = ImageEmbeddingCache(_IMAGE_CACHE_BYTES) if self.runner.vision else None
        self.images_encoded = 0  # images the vision step ran the tower on (the others were cached)

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

    @property
    def cached_slots(self) -> int:
        return self.prefix_cache.cached_slots if self.prefix_cache is not None else 0

    def tokens_held(self) -> int:
        """KV slots live requests hold privately plus the cache's; always equals used_slots (zero waste)."""
        return sum(len(r.slots) - r.sched.shared_len for r in self._live.values()) + self.cached_slots

    def flush_cache(self) -> int:
        """Drop every cache entry no live request uses; returns the slots freed."""
        if self.prefix_cache is None:
            return 0
        freed = self.prefix_cache.flush()
        self.free_slots.free(freed)
        return len(freed)

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
        if params.structured_outputs is not None:
            self._grammars().check(params.structured_outputs)
        if params.allowed_token_ids is not None:
            bad = next((t for t in params.allowed_token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"allowed_token_ids: token id {bad} is outside the vocabulary [0, {vocab})")

    def _grammars(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs the model's tokenizer; this engine has none")
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_cfg.vocab_size,
                                                     self.config.resolved_eos_ids)
        return self._grammar_compiler

    def add_request(self, req_id: int, prompt_ids: list[int], params: SamplingParams,
                    images: list[ImageData] | None = None) -> None:
        """`images`: the prompt's images (lightllm_plugin/images.py), each on its placeholder tokens."""
        if req_id in self._live:
            raise ValueError(f"request id {req_id} is already in use")
        prompt_ids = [int(t) for t in prompt_ids]
        self.validate(prompt_ids, params)
        mm, cache_ids = None, prompt_ids
        if images:
            if not self.runner.vision:
                raise ValueError("images: this model is text-only; it does not take images")
            if self.pooler is not None:
                raise ValueError("images: a pooling task (reward, embed, classify, score) takes text only")
            model = self.runner.model
            check_images(prompt_ids, images, self.model_cfg.image_token_id, model.image_tokens)
            mm, cache_ids = build_prompt(prompt_ids, images, model)
        generator = self.runner.add_generator(req_id, params.seed) if params.seed is not None else None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.config.resolved_eos_ids)
        # a pooling request ends with its prefill; the one step the peak rule counts is that step
        max_new_tokens = 1 if self.pooler is not None else params.max_new_tokens
        sched = SchedRequest(req_id=req_id, prompt_len=len(prompt_ids), max_new_tokens=max_new_tokens,
                             prompt_ids=cache_ids, salt=params.cache_salt)
        sampler = SamplerRow(params, prompt_ids, [], generator, [])
        live = _LiveRequest(req_id, prompt_ids, params, sched, sampler, frozenset(stop_ids), mm=mm, cache_ids=cache_ids)
        live.sampler.output_ids = live.output_ids
        self._live[req_id] = live
        if params.allowed_token_ids is not None:
            live.sampler.grammar = AllowedTokens(params.allowed_token_ids, self.model_cfg.vocab_size)
        if params.structured_outputs is not None:
            live.grammar_pending = self._grammars().submit(params.structured_outputs)
            self._compiling[req_id] = live
            self._schedule_compiled()
        else:
            self.scheduler.add(sched)

    def _schedule_compiled(self, wait_s: float = 0.0) -> None:
        """Hand the requests whose grammar has compiled to the scheduler; with wait_s, wait up to
        that long for the first one when nothing else could run."""
        for req_id, live in list(self._compiling.items()):
            future = live.grammar_pending
            if not future.done() and wait_s > 0:
                try:
                    future.result(timeout=wait_s)
                except FutureTimeout:
                    pass
                except Exception:
                    pass  # reported below
                wait_s = 0.0
            if not future.done():
                continue
            del self._compiling[req_id]
            live.grammar_pending = None
            try:
                live.sampler.grammar = self._grammars().matcher(future.result())
            except Exception as exc:
                # check() parsed the spec already: the library could not compile what it parsed
                logger.warning("the grammar of request %d did not compile (%s): ending it", req_id, exc)
                self._failed.append((req_id, GrammarCompiler.compile_error(live.params.structured_outputs, exc)))
                self.abort(req_id)
                continue
            self.scheduler.add(live.sched)

    def close(self) -> None:
        """Stop the threads the structured outputs started (grammar compiling, mask filling); a
        later constrained request starts them again."""
        if self._grammar_compiler is not None:
            self._grammar_compiler.close()
            self._grammar_compiler = None
        self.runner.close()

    def take_failed(self) -> list[tuple[int, str]]:
        """Requests the engine ended on its own since the last call, without an event (their
        grammar did not compile), each with the message for its client; their slots are free."""
        failed, self._failed = self._failed, []
        return failed

    def abort(self, req_id: int) -> bool:
        """Drop a request now; its KV slots return to the free-list at once."""
        live = self._live.pop(req_id, None)
        if live is None:
            return False
        self._compiling.pop(req_id, None)
        self._release(live)
        return True

    def finish(self, req_id: int) -> bool:
        """The detokenizer matched a stop string: same release as abort."""
        return self.abort(req_id)

    def _release(self, live: _LiveRequest, keep_tokens: bool = True) -> None:
        """Give back a request's slots: with the cache on, what it computed goes into the cache
        (the tokens whose KV is written: a request's last sampled token has none) and only the
        copies of tokens the cache already held return to the free-list."""
        self.scheduler.remove(live.req_id)
        sched, cache = live.sched, self.prefix_cache
        if cache is not None and keep_tokens and live.slots:
            tokens = live.cache_ids + live.output_ids
            n = min(len(tokens), len(live.slots))
            _, present = cache.insert(tokens[:n], live.slots[:n], sched.salt)
            self.free_slots.free(live.slots[sched.shared_len:present] + live.slots[n:])
        else:
            self.free_slots.free(live.slots[sched.shared_len:])
        if sched.cache_node is not None:
            cache.unlock(sched.cache_node)
            sched.cache_node = None
        live.slots = []
        if live.row >= 0:
            self._table_writes = [w for w in self._table_writes if w[0] != live.row]
            self.runner.req_table.free_row(live.row)
            live.row = -1
        self.runner.drop_request(live.req_id)

    def fail_running(self) -> list[int]:
        """After step() raised: drop every request of the running batch (the step's requests),
        freeing their slots and rows, and forget any queued step. Waiting requests stay. The
        cache is emptied too: the failed step may have left its entries half written."""
        self._queued = None
        failed = [r.req_id for r in self.scheduler.running]
        for req_id in failed:
            live = self._live.pop(req_id, None)
            if live is not None:
                self._release(live, keep_tokens=False)
        self.flush_cache()
        return failed

    def _allocate(self, n: int) -> list[int]:
        """n free slots, evicting unused cache entries when the free-list runs short (admission
        counted them as free, so there are always enough)."""
        short = n - self.free_slots.num_free
        if short > 0 and self.prefix_cache is not None:
            self.free_slots.free(self.prefix_cache.evict(short))
        return self.free_slots.allocate(n)

    def _cache_prompt(self, live: _LiveRequest, adopted: list[tuple[int, int, int, int]]) -> None:
        """The last chunk of live's prompt is in this step: the prompt goes into the cache now, so
        the requests admitted next step share it. Tokens the cache held already (another request
        put them there, or a repeated prompt's last token) are read from the cache's slots from
        the next step on: `adopted` gets (row, position, cache slot, own slot) for each, and the
        caller frees the own slots once this step is launched (this step still writes them)."""
        sched, cache = live.sched, self.prefix_cache
        node, present = cache.insert(live.cache_ids, live.slots[: sched.prompt_len], sched.salt)
        if present > sched.shared_len:
            cached = node.path_slots()[sched.shared_len : present]
            own = live.slots[sched.shared_len : present]
            adopted.extend(zip([live.row] * len(own), range(sched.shared_len, present), cached, own))
            live.slots[sched.shared_len : present] = cached
        cache.lock(node)
        if sched.cache_node is not None:
            cache.unlock(sched.cache_node)
        sched.cache_node = node
        sched.shared_len = sched.prompt_len

    def _take_table_writes(self) -> TableWrites | None:
        if not self._table_writes:
            return None
        rows, positions, slots = (list(column) for column in zip(*self._table_writes))
        self._table_writes = []
        return TableWrites(rows, positions, slots)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[TokenEvent] | list[PoolingEvent]:
        """Run one step and return its events.

        On the CUDA-graph path a decode step is queued before the previous one is read back, its
        input ids taken from the tokens still on the device: the GPU never waits for the host's
        bookkeeping. A request that turns out to have finished (eos) in the step read back had
        one token too many computed in the queued step; that token is dropped, and its KV slot
        freed with the others. With a grammar in the batch the step behind it is queued as a forward
        only, its sampling launched once the grammars have taken the tokens read back (see _read_back).
        """
        if self._compiling:
            idle = not self._ahead and not self.scheduler.num_running and not self.scheduler.num_waiting
            self._schedule_compiled(_GRAMMAR_WAIT_S if idle else 0.0)
        launched = self._ahead.pop(0) if self._ahead else None
        if launched is None:
            batch = self.scheduler.schedule()
            if batch.is_empty():
                return []
            if self.pooler is not None:
                return self._pooling_step(batch)
            launched = self._launch_scheduled(batch)
        elif launched.deferred is not None:
            # its sampling waited for the tokens of the step before, which are read by now
            launched.pending, launched.deferred = launched.deferred.launch(), None
        if not self._ahead:
            queued = self._queue_next_decode(launched)
            if queued is not None:
                self._ahead.append(queued)
        return self._read_back(launched)

    def _launch_scheduled(self, batch) -> _LaunchedStep:
        entries: list[StepEntry] = []
        order: list[_LiveRequest] = []
        for sched in batch.decode:
            live = self._live[sched.req_id]
            entries.append(self._decode_entry(live, len(live.output_ids), live.output_ids[-1]))
            order.append(live)
        self._place_admitted(batch)
        if self.image_cache is not None:
            self._vision_step(batch.prefill)
        adopted: list[tuple[int, int, int, int]] = []
        for sched in batch.prefill:
            live = self._live[sched.req_id]
            start, n = sched.chunk_start, sched.chunk_len
            slots = self._allocate(n)
            live.slots.extend(slots)
            last_chunk = sched.prefill_done
            sampler = live.sampler if last_chunk else None
            entries.append(StepEntry(live.row, live.prompt_ids[start : start + n], start, slots, sampler, live.mm))
            if last_chunk:
                order.append(live)
                if self.prefix_cache is not None:
                    self._cache_prompt(live, adopted)
        for live in order:
            live.sampler.blocked_ids = self._blocked_ids(live, len(live.output_ids))
        try:
            pending = self.runner.launch(entries, table_writes=self._take_table_writes())
        finally:
            # launched or failed, the own copies are no request's any more (live.slots holds the
            # cache's): freed here, or a failed step would leak them
            if adopted:
                self.free_slots.free([own for _, _, _, own in adopted])
                self._table_writes.extend((row, pos, slot) for row, pos, slot, _ in adopted)
        return _LaunchedStep(order, pending)

    def _vision_step(self, prefill) -> None:
        """Embeddings for the images this step's prompt chunks reach: from the cache, or the vision
        tower over all the missing ones at once (of every request in the step), before the
        language model's forward. An image inside a cached prefix is never encoded."""
        missing: dict[str, tuple[MultimodalPrompt, list]] = {}
        for sched in prefill:
            live = self._live[sched.req_id]
            if live.mm is None:
                continue
            for span in live.mm.unencoded(sched.chunk_start, sched.chunk_start + sched.chunk_len):
                cached = self.image_cache.get(span.hash)
                if cached is not None:
                    span.set_embedding(cached)
                else:
                    missing.setdefault(span.hash, (live.mm, []))[1].append(span)
        if not missing:
            return
        groups = list(missing.values())
        pixels = [mm.pixels(spans[0]) for mm, spans in groups]
        grids = [spans[0].grid for _, spans in groups]
        embeddings = self.runner.encode_images(pixels, grids)
        self.images_encoded += len(groups)
        for (_, spans), embedding in zip(groups, embeddings):
            self.image_cache.put(spans[0].hash, embedding)
            for span in spans:
                span.set_embedding(embedding)

    def _pooling_step(self, batch) -> list[PoolingEvent]:
        """A step of pooling requests: prompt chunks only (none ever decodes). A request whose
        last chunk is in the step gets its vector and is released in this same step, its prompt
        going into the prefix cache (last-token pooling) and its other slots to the free-list."""
        self._place_admitted(batch)
        entries: list[StepEntry] = []
        lives: list[_LiveRequest] = []
        for sched in batch.prefill:
            live = self._live[sched.req_id]
            start, n = sched.chunk_start, sched.chunk_len
            slots = self._allocate(n)
            live.slots.extend(slots)
            entries.append(StepEntry(live.row, live.prompt_ids[start : start + n], start, slots, None))
            lives.append(live)
        pooled = self.runner.pool(entries, table_writes=self._take_table_writes())  # [B, hidden]
        finished, vectors = [], []
        for i, live in enumerate(lives):
            if self.pooler.pooling == "mean":
                live.pooled_sum = pooled[i] if live.pooled_sum is None else live.pooled_sum + pooled[i]
            if live.sched.prefill_done:
                finished.append(live)
                vectors.append(pooled[i] if self.pooler.pooling == "last" else live.pooled_sum / live.sched.prompt_len)
        if not finished:
            return []
        data = self.runner.pooled_output(torch.stack(vectors)).cpu().tolist()
        events = []
        for live, values in zip(finished, data):
            events.append(PoolingEvent(live.req_id, values, live.sched.prompt_len, live.sched.cached_len))
            del self._live[live.req_id]
            self._release(live)
        return events

    def _place_admitted(self, batch) -> None:
        for sched in batch.admitted:
            live = self._live[sched.req_id]
            live.row = self.runner.req_table.alloc_row()
            if self.prefix_cache is not None:
                self.cache_query_tokens += sched.prompt_len
                self.cache_hit_tokens += sched.cached_len
            if sched.cached_len:
                live.slots = sched.cache_node.path_slots()
                self._table_writes.extend((live.row, pos, slot) for pos, slot in enumerate(live.slots))

    def _decode_entry(self, live: _LiveRequest, output_len: int, token: int) -> StepEntry:
        """Feed back output token number `output_len` (1-based) into one new KV slot."""
        slots = self._allocate(1)
        live.slots.extend(slots)
        return StepEntry(live.row, [token], len(live.prompt_ids) + output_len - 1, slots, live.sampler, live.mm)

    def _blocked_ids(self, live: _LiveRequest, output_len: int) -> list[int]:
        return sorted(live.stop_ids) if output_len < live.params.min_new_tokens else []

    def _queue_next_decode(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Queue the decode step that follows `launched` while it still runs, when the host
        already knows that step's batch: nobody the scheduler could admit (none waiting, or the
        requests that go on fill running_max_req_size: it would give exactly the running
        requests), no penalties (they read the output ids), and a CUDA-graph step. Requests that
        reach max_new_tokens in `launched` are left out. With a grammar in the batch only the
        forward is queued: the masks need `launched`'s tokens, so the sampling is launched once
        they are read (the host's reading and mask filling overlap the forward). A request that
        stops on a token in `launched` frees its place for a waiting one a step later than
        without queuing."""
        if launched.pending is None:
            return None
        plan = self._plan_next_decode(launched)
        return self._launch_planned(plan, launched.pending.tokens) if plan is not None else None

    def _plan_next_decode(self, launched: _LaunchedStep):
        """The host's part of queuing the step after `launched` (whose sampling may not be launched
        yet): (its requests, their entries with their KV slots taken, their rows in `launched` or
        None for all of them); None when it is not queued (see _queue_next_decode)."""
        if not self.scheduler.all_prefilled():
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
                return None  # penalties read the output ids
            rows.append(i)
            order.append(live)
        if not order or not self.runner.can_chain(len(order)):
            return None
        if self.scheduler.num_waiting and len(order) < self.scheduler.running_max_req_size:
            return None  # a place opens: the next step admits a waiting request
        entries = []
        for live in order:
            output_len = len(live.output_ids) + 1
            live.sampler.blocked_ids = self._blocked_ids(live, output_len)
            entries.append(self._decode_entry(live, output_len, 0))  # the token comes from the device
        return order, entries, rows if len(rows) != len(launched.order) else None

    def _launch_planned(self, plan, tokens: torch.Tensor, staged: tuple[int, int] | None = None) -> _LaunchedStep:
        """Queue a planned step; its input ids are `tokens` ([B] of the step before, on the device).
        `staged`: the runner's stage_chained of the plan's entries, done earlier."""
        order, entries, rows = plan
        if rows is not None:
            tokens = tokens[torch.tensor(rows, dtype=torch.long, pin_memory=True).to(tokens.device, non_blocking=True)]
        self.steps_queued_ahead += 1
        # a grammar's mask needs the token the step before samples: only the forward is queued now
        constrained = any(live.sampler.grammar is not None for live in order)
        table_writes = self._take_table_writes() if staged is None else None
        result = self.runner.launch(entries, chained_ids=tokens, table_writes=table_writes,
                                    defer_sampling=constrained, staged=staged)
        if constrained:
            return _LaunchedStep(order, None, deferred=result)
        return _LaunchedStep(order, result)

    def _read_back(self, launched: _LaunchedStep) -> list[TokenEvent]:
        """Wait for `launched`'s tokens and turn them into events. When the step queued behind it
        waits for its masks (a grammar in the batch), the grammars take the tokens first, the masks
        are filled meanwhile, and that step's sampling and the forward of the step after it are
        launched before the return: two forwards stay ahead of the host, as without a grammar."""
        if launched.pending is None:
            return []
        result = launched.pending.result()
        taken = [(i, live) for i, live in enumerate(launched.order) if self._live.get(live.req_id) is live]
        # a request finished or aborted after this step was queued: its token is dropped
        reasons = []
        for i, live in taken:
            token = result.token_ids[i]
            live.output_ids.append(token)
            live.sched.output_len = len(live.output_ids)
            reasons.append(self._finish_reason(live, token))
        constrained = [(k, live.sampler.grammar) for k, (_, live) in enumerate(taken)
                       if live.sampler.grammar is not None and reasons[k] is None]
        if constrained:
            grammars = [g for _, g in constrained]
            accepted = accept_tokens(grammars, [taken[k][1].output_ids[-1] for k, _ in constrained])
            for (k, grammar), ok in zip(constrained, accepted):
                if not ok or grammar.terminated:
                    # the grammar is complete (its stop token was sampled under ignore_eos, or it
                    # takes nothing more), or the token broke it (only a fault could sample a masked token)
                    reasons[k] = "stop"
        # the step behind, on the device, waits for its masks: filled on the grammar worker while
        # this thread builds the events and plans the step after it
        queued = self._ahead[0] if self._ahead and self._ahead[0].deferred is not None else None
        masks = queued.deferred.start_masks() if queued is not None else None
        events = []
        want_lp = result.logprobs is not None
        for (i, live), reason in zip(taken, reasons):
            params = live.params
            events.append(
                TokenEvent(
                    req_id=live.req_id,
                    token_id=live.output_ids[-1],
                    logprob=result.logprobs[i] if want_lp and params.logprobs is not None else None,
                    top_logprobs=result.top_logprobs[i] if result.top_logprobs is not None and params.logprobs else None,
                    finish_reason=reason,
                    output_len=len(live.output_ids),
                    prompt_len=len(live.prompt_ids),
                    cached_len=live.sched.cached_len,
                )
            )
            if reason is not None:
                del self._live[live.req_id]
                self._release(live)
        if queued is not None:
            plan = self._plan_next_decode(queued)
            # the next forward's inputs go to the device while the masks are still being filled;
            # only its input ids wait for the sampling
            staged = self.runner.stage_chained(plan[1], self._take_table_writes()) if plan is not None else None
            queued.pending, queued.deferred = queued.deferred.launch(masks), None
            if plan is not None:
                # behind it at once: its forward only needs the tokens on the device
                self._ahead.append(self._launch_planned(plan, queued.pending.tokens, staged))
        return events

    def _finish_reason(self, live: _LiveRequest, token: int) -> str | None:
        n_out = len(live.output_ids)
        if token in live.stop_ids and n_out >= live.params.min_new_tokens:
            return "stop"
        if n_out >= live.params.max_new_tokens:
            return "length"
        return None
