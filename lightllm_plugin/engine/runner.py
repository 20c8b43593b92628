"""ModelRunner: one model worker. Owns the GPU-side state (model, KV pool, req_to_token)
and turns a step plan from the core into one forward pass plus sampling.

Under tensor parallelism each rank has a runner over its part of the model. Rank 0's runner
(in the router) sends every forward's packed step to the other ranks before running it;
theirs run the same forward from that plan (`run_plan`), and only rank 0 samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.cuda_graphs import DecodeGraphs
from lightllm_plugin.engine.memory import (
    allocate_kv_pool,
    kv_bytes_per_token,
    profiled_slot_count,
)
from lightllm_plugin.engine.multimodal import MultimodalPrompt, step_inputs
from lightllm_plugin.engine.req_table import ReqTable
from lightllm_plugin.engine.sampling import (
    DeferredSample,
    PendingSample,
    SamplerRow,
    launch_sample,
)
from lightllm_plugin.engine.step_plan import PlanSender, StepPlan
from lightllm_plugin.engine.structured_output import BitmaskStager
from lightllm_plugin.models.cpu_weights import StepRows, quantize_projections
from lightllm_plugin.models.kv_cache import AttentionMetadata, QuantizedKVCache
from lightllm_plugin.models.llama import Projection
from lightllm_plugin.models.loader import (
    InMemoryCheckpoint,
    load_checkpoint,
    load_model,
    read_hf_config,
    registered_models,
)
from lightllm_plugin.models.moe import moe_workspace_bytes
from lightllm_plugin.models.pooling_config import resolve_pooler
from lightllm_plugin.models.tensor_parallel import TPGroup

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# on CPU a pool larger than this many full-length requests is never used: the CPU engine is too
# slow to keep more requests running at once (the mmap'd pool only takes RAM where tokens are written)
_CPU_POOL_REQUESTS = 8


@dataclass
class StepEntry:
    """One request's share of a forward pass."""

    row: int  # its req_to_token row
    input_ids: list[int]  # tokens whose K/V are computed this step
    start_pos: int  # position of input_ids[0]
    slots: list[int]  # KV slots of input_ids
    sampler: SamplerRow | None  # None: a prompt chunk that is not its last, nothing is sampled
    mm: MultimodalPrompt | None = None  # a request with images: its positions and embeddings


@dataclass
class TableWrites:
    """req_to_token entries to write before a step: the slots of a cached prefix a request reuses,
    or the cache's slots replacing a request's own copies of tokens the cache already held."""

    rows: list[int]
    positions: list[int]
    slots: list[int]

    def __len__(self) -> int:
        return len(self.rows)


def _pooling_source(kind: str, path: str, checkpoint: InMemoryCheckpoint | None, task: str):
    """(HF config dict, folder) that decide a checkpoint's task. A GGUF file is a causal LM with
    no sentence-transformers files: its metadata is read only when a pooling task is asked for."""
    if checkpoint is not None:
        return checkpoint.hf_config, None
    if kind == "hf":
        return read_hf_config(path), path
    if task in ("auto", "generate"):
        return {"architectures": ["LlamaForCausalLM"]}, None
    from lightllm_plugin.models.gguf import gguf_model_config

    return gguf_model_config(path), None


def resolve_device_and_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device_name = config.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but CUDA is not available")
    if config.data_type == "auto":
        # CPU: the exact path. The bfloat16 one decodes twice as fast, but its greedy tokens keep
        # float32's on only 4 to 6 of the 8 test chats, as rounding elsewhere moves its near-ties
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[config.data_type]
    if device.type == "cpu" and dtype == torch.float16:
        # LazyLLM passes float16 by default; the CPU kernels' low precision is bfloat16
        logger.info("data_type=float16 on CPU: running the bfloat16 CPU path")
        dtype = torch.bfloat16
    return device, dtype


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_kind: str,
        model_path: str,
        progress: bool = True,
        checkpoint: InMemoryCheckpoint | None = None,
        tp_group: TPGroup | None = None,  # this rank's tensor-parallel group (config.tp > 1)
        plan_sender: PlanSender | None = None,  # rank 0 only: where the other ranks' plans go
    ):
        self.config = config
        self.tp_group = tp_group
        self.plan_sender = plan_sender
        self.device, self.dtype = resolve_device_and_dtype(config)
        # below float32 on CPU: float32 activations, quantized projections for decode steps
        # (models/cpu_weights.py) and a KV pool of self.dtype
        cpu_quantized = self.device.type == "cpu" and self.dtype != torch.float32
        self.step_rows: StepRows | None = None  # which rows of a step take the quantized weights
        model_dtype = torch.float32 if cpu_quantized else self.dtype
        config.resolved_device = self.device.type
        # a model without a sampler (reward, classifier, embedding): resolved before loading,
        # so a task the checkpoint cannot serve is reported at once
        self.pooler = resolve_pooler(*_pooling_source(model_kind, model_path, checkpoint, config.task), config.task)
        config.pooler = self.pooler
        config.resolved_task = self.pooler.task if self.pooler is not None else "generate"
        if self.pooler is not None and tp_group is not None:
            raise ValueError(f"--task {self.pooler.task} runs with --tp 1 (pooling models are not split)")
        models = registered_models(skip_broken=config.skip_broken_plugins)
        if checkpoint is not None:
            self.model, self.model_cfg = load_checkpoint(
                checkpoint, model_dtype, self.device, config.max_req_total_len, progress=progress, tp=tp_group,
                models=models,
            )
        else:
            self.model, self.model_cfg = load_model(
                model_kind, model_path, model_dtype, self.device, config.max_req_total_len, progress=progress,
                tp=tp_group, models=models,
            )
        # a vision-language model: image embeddings and M-RoPE positions go with each step
        self.vision = hasattr(self.model, "encode_images")
        if self.vision and tp_group is not None:
            raise ValueError("vision-language models run with tp=1 (the image embeddings are not split)")
        if cpu_quantized:
            self.step_rows = StepRows()
            counts = quantize_projections(self.model, Projection, int8=True, step_rows=self.step_rows)
            logger.info("CPU decode: %d projections keep their 4-bit codes, %d get int8 codes, KV cache %s",
                        counts["int4"], counts["int8"], self.dtype)
        # what the KV pool stores: the model dtype, or int8 values with float16 scales
        self.kv_dtype = torch.int8 if config.kv_cache_dtype == "int8" else self.dtype
        config.resolved_dtype = str(self.dtype).removeprefix("torch.")
        self._clamp_lengths_to_model()
        self.req_table = ReqTable(config.running_max_req_size, config.max_req_total_len, self.device)
        self.kv_pool: torch.Tensor | QuantizedKVCache | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self._request_generators: dict[int, torch.Generator] = {}
        self._bitmasks: BitmaskStager | None = None  # staging of the grammars' token masks, kept across steps

    def _clamp_lengths_to_model(self) -> None:
        # callers such as LazyLLM pass one max_req_total_len (64000) for every model; beyond the
        # trained context a model only degrades, so cap it there instead of refusing to start.
        # Sliding-window attention is not implemented: within the window it equals full attention.
        config, model_cfg = self.config, self.model_cfg
        limit = min(model_cfg.max_position_embeddings, model_cfg.sliding_window or model_cfg.max_position_embeddings)
        if config.max_req_total_len <= limit:
            return
        logger.warning("max_req_total_len=%d exceeds the model's context or attention window (%d): using %d",
                       config.max_req_total_len, limit, limit)
        config.max_req_total_len = limit
        config.max_req_input_len = min(config.max_req_input_len, limit - 1)

    # ---- memory sizing -------------------------------------------------------------
    def size_kv_pool(self) -> int:
        """Warm up, size and allocate the KV pool, then capture the decode graphs (CUDA only:
        they take their memory from what the pool left). Returns the slot count."""
        cfg = self.model_cfg
        per_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)
        if self.config.max_total_token_num is not None:
            slots = self.config.max_total_token_num
        else:
            warmup_tokens = self.config.batch_max_tokens if self.device.type == "cuda" else 8
            self._warmup(warmup_tokens)
            if self.device.type == "cuda":
                cap = self.config.running_max_req_size * self.config.max_req_total_len
            else:
                cap = _CPU_POOL_REQUESTS * self.config.max_req_total_len
            # the experts' scratch is freed after the warm-up like every activation, but it is k
            # times a dense MLP's and must still fit beside a full pool (mem_fraction may be 1)
            reserve = moe_workspace_bytes(cfg, min(warmup_tokens, self.config.max_req_total_len),
                                          self.model.embed_tokens.weight.dtype)
            slots = profiled_slot_count(self.device, self.config.mem_fraction, per_token, cap, reserve)
        if self.tp_group is not None:
            # every rank must hold every slot the router hands out: the smallest pool wins
            slots = self.tp_group.min_int(slots)
        self.kv_pool = allocate_kv_pool(cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype, self.device)
        # Under tensor parallelism decode runs eagerly: a graph replay would have to be
        # mirrored on every rank, and chained steps take input ids only rank 0 has.
        # pooling requests end with their prefill: there is no decode step to capture
        # an M-RoPE model's decode positions are shifted by each request's delta, which the
        # captured graphs (position = sequence index) do not take: its steps run eagerly
        if self.device.type == "cuda" and not self.config.enforce_eager and self.tp_group is None \
                and self.pooler is None and not getattr(self.model, "shifted_positions", False):
            self.decode_graphs = DecodeGraphs(
                self.model, self.kv_pool, self.req_table.req_to_token, self.req_table.scratch_row,
                self.config.running_max_req_size,
            )
            self.decode_graphs.capture()
        return slots

    def _warmup(self, num_tokens: int) -> None:
        """A forward at the largest prefill so the profiled free memory leaves room for activations."""
        num_tokens = min(num_tokens, self.config.max_req_total_len)
        cfg = self.model_cfg
        pool = allocate_kv_pool(cfg.num_layers, num_tokens, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype, self.device)
        row = self.req_table.alloc_row()
        try:
            entry_slots = list(range(num_tokens))
            # every rank warms up the same way, so no plan is sent
            self._forward([StepEntry(row, [0] * num_tokens, 0, entry_slots, None)], pool, send_plan=False)
        finally:
            self.req_table.free_row(row)
            del pool

    # ---- per-request state --------------------------------------------------------
    def add_generator(self, req_id: int, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self._request_generators[req_id] = gen
        return gen

    def drop_request(self, req_id: int) -> None:
        self._request_generators.pop(req_id, None)

    # ---- one step ----------------------------------------------------------------------
    def _forward(
        self,
        entries: list[StepEntry],
        kv_pool: torch.Tensor | QuantizedKVCache,
        all_logits: bool = False,
        send_plan: bool = True,
        table_writes: TableWrites | None = None,
    ) -> torch.Tensor:
        """Logits of each entry's last token [B, V], or with all_logits of every new token [T, V]."""
        plan = self._pack(entries, all_logits, table_writes)
        if send_plan and self.plan_sender is not None:
            self.plan_sender.send(plan)
        mm = step_inputs(entries, self.device) if self.vision else None
        return self._run_packed(plan, kv_pool, mm=mm)

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> None:
        """A rank other than 0: the forward rank 0 announced (its logits are rank 0's business)."""
        self._run_packed(plan, self.kv_pool)

    def _pack(self, entries: list[StepEntry], all_logits: bool, table_writes: TableWrites | None = None) -> StepPlan:
        """The whole step in one int64 host buffer, so it moves in one copy (and to the other
        tensor-parallel ranks in one message)."""
        input_ids, positions, slots, token_rows = [], [], [], []
        b_req_idx, b_seq_len, b_q_start, b_q_len, last_index = [], [], [], [], []
        for e in entries:
            n = len(e.input_ids)
            b_q_start.append(len(input_ids))
            input_ids.extend(e.input_ids)
            positions.extend(range(e.start_pos, e.start_pos + n))
            slots.extend(e.slots)
            token_rows.extend([e.row] * n)
            b_req_idx.append(e.row)
            b_seq_len.append(e.start_pos + n)
            b_q_len.append(n)
            last_index.append(len(input_ids) - 1)
        fields = [input_ids, positions, slots, token_rows, b_req_idx, b_seq_len, b_q_start, b_q_len, last_index]
        if table_writes:
            fields += [table_writes.rows, table_writes.positions, table_writes.slots]
        packed = torch.tensor([v for f in fields for v in f], dtype=torch.long, pin_memory=self.device.type == "cuda")
        return StepPlan(packed, len(input_ids), len(entries), all_logits, len(table_writes) if table_writes else 0)

    def _run_packed(self, plan: StepPlan, kv_pool: torch.Tensor | QuantizedKVCache,
                    hidden_only: bool = False, mm=None) -> torch.Tensor:
        table = self.req_table.req_to_token
        t, b, w = plan.num_tokens, plan.num_requests, plan.num_writes
        packed = plan.packed.to(self.device, non_blocking=True)  # pinned on CUDA
        parts = packed.split([t, t, t, t, b, b, b, b, b, w, w, w])
        ids, pos, out_slots, rows, req_idx, seq_len, q_start, q_len, last = parts[:9]
        if w:
            w_rows, w_pos, w_slots = parts[9:]
            table[w_rows, w_pos] = w_slots.to(table.dtype)
        table[rows, pos] = out_slots.to(table.dtype)
        meta = AttentionMetadata(table, req_idx, seq_len, q_start, q_len, out_slots)
        if self.step_rows is not None:
            self.step_rows.update(q_start, q_len)
        if hidden_only:
            return self.model.hidden_states(ids, pos, kv_pool, meta)  # [T, hidden]
        if mm is not None:
            return self.model(ids, pos, kv_pool, meta, None if plan.all_logits else last, mm=mm)
        return self.model(ids, pos, kv_pool, meta, None if plan.all_logits else last)

    # ---- the vision step --------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixels: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """The vision tower over images of one or more requests in one batch: [tokens, hidden] each."""
        return self.model.encode_images(torch.cat(pixels).to(self.device), grids)

    # ---- pooling (models without a sampler) ---------------------------------------------
    @torch.inference_mode()
    def pool(self, entries: list[StepEntry], table_writes: TableWrites | None = None) -> torch.Tensor:
        """One prefill step of pooling requests: per entry [B, hidden] float32, its last token's
        final hidden state (last pooling) or the sum of its tokens' (mean pooling: the caller
        adds a prompt's chunks up and divides by its length)."""
        plan = self._pack(entries, all_logits=True, table_writes=table_writes)
        hidden = self._run_packed(plan, self.kv_pool, hidden_only=True)
        lengths = [len(e.input_ids) for e in entries]
        if self.pooler.pooling == "last":
            last = torch.tensor(lengths).cumsum(0) - 1
            return hidden[last.to(hidden.device)].float()
        owner = torch.repeat_interleave(torch.arange(len(entries)), torch.tensor(lengths)).to(hidden.device)
        sums = torch.zeros(len(entries), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        return sums.index_add_(0, owner, hidden.float())

    @torch.inference_mode()
    def pooled_output(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, hidden] pooled hidden states -> what the engine returns: the score head's logits
        [B, num_labels], or the embedding [B, hidden] (L2-normalized where the pooler says so)."""
        if self.pooler.head == "classify":
            return self.model.classify(pooled)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.pooler.normalize else pooled

    @torch.inference_mode()
    def teacher_forced_logprobs(self, token_ids: list[int], slots: list[int], chunk: int = 512) -> torch.Tensor:
        """log p(token_ids[i] | token_ids[:i]) for i = 1 .. n-1 ([n-1] float32), for perplexity.

        The text goes through the engine's own path: chunks of `chunk` tokens are prefilled one
        after another into `slots` of the KV pool (the caller takes them from the slot free-list
        and gives them back), each chunk attending to the earlier ones through the pool, as a
        prefix-cached prefill does; with an int8 pool every key and value is read back quantized."""
        if len(slots) != len(token_ids):
            raise ValueError("teacher_forced_logprobs: one slot per token")
        row = self.req_table.alloc_row()
        try:
            logprobs = []
            for start in range(0, len(token_ids), chunk):
                end = min(start + chunk, len(token_ids))
                entry = StepEntry(row, token_ids[start:end], start, slots[start:end], None)
                logits = self._forward([entry], self.kv_pool, all_logits=True)  # [n, V]
                logprobs.append(torch.log_softmax(logits.float(), dim=-1))
            lp = torch.cat(logprobs)[:-1]
            targets = torch.tensor(token_ids[1:], device=lp.device)
            return lp.gather(1, targets[:, None]).squeeze(1)
        finally:
            self.req_table.free_row(row)

    def can_chain(self, batch_size: int) -> bool:
        """Whether a decode step of this many requests replays a CUDA graph, and so can take its
        input ids from the device and be queued before the previous step is read back."""
        graphs = self.decode_graphs
        # enforce_eager is read per step so one engine can time both paths
        return graphs is not None and not self.config.enforce_eager and batch_size <= graphs.max_batch

    @torch.inference_mode()
    def launch(
        self,
        entries: list[StepEntry],
        chained_ids: torch.Tensor | None = None,
        table_writes: TableWrites | None = None,
        defer_sampling: bool = False,
        staged: tuple[int, int] | None = None,
    ) -> PendingSample | DeferredSample | None:
        """Queue one step (forward + sampling of the entries that have a sampler) without waiting
        for it; None when no entry samples. `chained_ids` ([B] on the device) are the input ids of a
        decode step whose previous tokens are not on the host yet. With defer_sampling only the
        forward is queued; the caller launches the sampling (DeferredSample.launch) before the
        next step, once the grammars have taken the previous tokens. `staged`: stage_chained's
        result for these entries (their table writes went with it)."""
        if staged is not None:
            logits = self.decode_graphs.replay(staged, chained_ids)
        elif self.can_chain(len(entries)) and all(len(e.input_ids) == 1 and e.sampler is not None for e in entries):
            if table_writes:
                self._write_table(table_writes)
            logits = self.decode_graphs.run(
                [e.input_ids[0] for e in entries], [e.start_pos for e in entries],
                [e.row for e in entries], [e.slots[0] for e in entries], ids_on_device=chained_ids,
            )
        elif chained_ids is not None:
            raise ValueError("a step with input ids on the device must be a CUDA-graph decode step")
        else:
            logits = self._forward(entries, self.kv_pool, table_writes=table_writes)  # [B, V]
        sampled = [i for i, e in enumerate(entries) if e.sampler is not None]
        if not sampled:
            return None
        if len(sampled) < len(entries):
            logits = logits[torch.tensor(sampled, device=logits.device)]
        rows = [entries[i].sampler for i in sampled]
        bitmasks = self._bitmask_stager(logits.shape[1]) if any(r.grammar is not None for r in rows) else None
        if defer_sampling:
            return DeferredSample(logits, rows, self.generator, bitmasks)
        return launch_sample(logits, rows, self.generator, bitmasks)

    @torch.inference_mode()
    def stage_chained(self, entries: list[StepEntry], table_writes: TableWrites | None = None) -> tuple[int, int]:
        """The host's part of a CUDA-graph decode step whose input ids will come from the device,
        queued ahead of work the host still has to queue before it (see DecodeGraphs.stage); then
        launch(entries, chained_ids=..., staged=...)."""
        if table_writes:
            self._write_table(table_writes)
        return self.decode_graphs.stage([e.start_pos for e in entries], [e.row for e in entries],
                                        [e.slots[0] for e in entries])

    def _bitmask_stager(self, vocab_size: int) -> BitmaskStager:
        if self._bitmasks is None or self._bitmasks.vocab_size != vocab_size:
            self.close()
            self._bitmasks = BitmaskStager(vocab_size, self.device)
        return self._bitmasks

    def close(self) -> None:
        """Stop the grammar-mask worker thread (started at the first constrained step)."""
        if self._bitmasks is not None:
            self._bitmasks.close()
            self._bitmasks = None

    def _write_table(self, writes: TableWrites) -> None:
        """req_to_token entries written ahead of a CUDA-graph step (the graph writes only its own)."""
        values = torch.tensor([writes.rows, writes.positions, writes.slots], dtype=torch.long, pin_memory=True)
        values = values.to(self.device, non_blocking=True)
        table = self.req_table.req_to_token
        table[values[0], values[1]] = values[2].to(table.dtype)
