"""Decode steps under CUDA graphs.

A decode step of a Llama-shaped model is a few hundred small kernel launches; at batch 1
the launch gaps alone cost more than reading the weights. The step (req_to_token write,
model forward, logits) is captured once per batch size of a ladder, largest first, all
graphs sharing one memory pool, and replayed with the batch padded up to the next size.

A padded row is a harmless request: token 0 at position 0 of the reserved scratch row of
req_to_token, writing its K/V into the pool's scratch slot (the extra last slot) and
attending to that one slot. Its logits are computed and dropped.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from lightllm_plugin.models.kv_cache import AttentionMetadata, QuantizedKVCache

logger = logging.getLogger(__name__)

# doubling while a step is bound by reading the weights (padding rows cost little), then steps of
# 128: from about 256 rows on an H100/H200 a decode step is bound by its arithmetic, so padding
# 257 rows to 512 would cost nearly twice the step. Sizes above running_max_req_size are not
# captured (the default, 256, captures nothing above 256).
_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024)
# rows of the static input buffer
_IDS, _POS, _ROW, _LEN, _SLOT = range(5)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The ladder capped at max_batch; a cap between two rungs is captured as its own size."""
    largest = min(max_batch, _LADDER[-1])
    return [b for b in _LADDER if b < largest] + [largest]


def padded_size(sizes: list[int], batch: int) -> int | None:
    """The smallest captured size holding `batch` rows; None when none does."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        # [layers, slots+1, 2*Hkv, D], or the int8 pool: its values and scales are both static
        # tensors, captured by the graphs like the full-precision pool
        kv_pool: torch.Tensor | QuantizedKVCache,
        req_to_token: torch.Tensor,  # [R+1, L]
        scratch_row: int,
        max_batch: int,
    ):
        device = kv_pool.device
        self.model = model
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.sizes = graph_batch_sizes(max_batch)
        largest = self.sizes[-1]
        self.padding = (0, 0, scratch_row, 1, kv_pool.shape[1] - 1)  # ids, pos, row, len, slot
        # pinned host buffers and one device twin: a whole step's inputs in one copy. Two host
        # buffers, used in turn, because the core queues a step while the one before it still
        # runs: the buffer being filled was last copied two steps ago.
        padded = torch.tensor([self.padding] * largest, dtype=torch.int64).T.contiguous()  # [5, Bmax]
        self.host = [padded.pin_memory(), padded.clone().pin_memory()]
        self.host_np = [h.numpy() for h in self.host]
        self.inputs = padded.to(device)
        self.q_start = torch.arange(largest, dtype=torch.int64, device=device)
        self.q_len = torch.ones(largest, dtype=torch.int64, device=device)
        self.copied = [torch.cuda.Event(), torch.cuda.Event()]
        for event in self.copied:
            event.record()
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _step(self, bs: int) -> torch.Tensor:
        ids, pos, rows, lens, slots = (self.inputs[k, :bs] for k in range(5))
        self.req_to_token[rows, pos] = slots.to(torch.int32)
        meta = AttentionMetadata(self.req_to_token, rows, lens, self.q_start[:bs], self.q_len[:bs], slots)
        return self.model(ids, pos, self.kv_pool, meta)  # [bs, V] float32

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        # largest first: the smaller graphs then fit inside the memory the largest left in the pool
        for bs in reversed(self.sizes):
            # outside capture first: Triton compiles and cuBLAS picks its kernels here
            self._step(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._step(bs)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.sizes, time.perf_counter() - t0)

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        rows: list[int],
        slots: list[int],
        ids_on_device: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step for len(positions) requests; returns their logits [B, V] (a view of a
        static buffer, valid until the next replay). `ids_on_device` ([B], on the GPU) replaces
        `input_ids`: the tokens a step still running will have sampled."""
        staged = self.stage(positions, rows, slots, None if ids_on_device is not None else input_ids)
        return self.replay(staged, ids_on_device)

    def stage(self, positions: list[int], rows: list[int], slots: list[int],
              input_ids: list[int] | None = None) -> tuple[int, int]:
        """The host's part of a step: its inputs (the ids too, unless they will come from the
        device) into a pinned buffer, and that buffer's copy into the static inputs queued. The graph
        queued before reads the inputs first (stream order), so a step can be staged while the host
        still has to queue other work before its replay, but no other graph may replay in between.
        Returns (batch, padded size) for replay."""
        batch = len(positions)
        bs = padded_size(self.sizes, batch)
        turn, self._turn = self._turn, self._turn ^ 1
        self.copied[turn].synchronize()
        host = self.host_np[turn]
        if input_ids is not None:
            host[_IDS, :batch] = input_ids
        host[_POS, :batch] = positions
        host[_ROW, :batch] = rows
        host[_LEN, :batch] = [p + 1 for p in positions]
        host[_SLOT, :batch] = slots
        for k, value in enumerate(self.padding):
            host[k, batch:bs] = value
        self.inputs.copy_(self.host[turn], non_blocking=True)
        self.copied[turn].record()
        return batch, bs

    def replay(self, staged: tuple[int, int], ids_on_device: torch.Tensor | None = None) -> torch.Tensor:
        """Replay a staged step; `ids_on_device` ([B], on the GPU): its input ids."""
        batch, bs = staged
        if ids_on_device is not None:
            self.inputs[_IDS, :batch].copy_(ids_on_device)
        self.graphs[bs].replay()
        self.replays += 1
        return self.logits[bs][:batch]
