"""Token-granular KV memory: the slot free-list (router side) and the pool tensor (worker side).

Every slot holds the K and V of exactly one token of one request, so memory in use is
exactly the tokens held by live requests: no blocks, no internal fragmentation.
"""

from __future__ import annotations

import math
import mmap

import torch

from lightllm_plugin.models.kv_cache import KV_SCALE_DTYPE, QuantizedKVCache


class SlotFreeList:
    """A stack of free slot indices. Pure python: allocation never touches the device.

    Slots come out in ascending runs and go back so that they come out that way again: the KV
    of a request whose slots are one run can be read in place (the CPU attention does)."""

    def __init__(self, total_slots: int):
        if total_slots < 1:
            raise ValueError(f"the KV pool needs at least one slot, got {total_slots}")
        self.total_slots = total_slots
        self._free = list(range(total_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.total_slots - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV pool exhausted: asked for {n} slots, {len(self._free)} free")
        if n == 0:
            return []
        slots = self._free[-n:]
        del self._free[-n:]
        slots.reverse()
        return slots

    def free(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))
        if len(self._free) > self.total_slots:
            raise RuntimeError("KV slot freed twice: the free-list grew past the pool size")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's K and V take; `dtype` torch.int8 is the quantized pool, scales included."""
    per_head = head_dim * _element_size(dtype)
    if dtype == torch.int8:
        per_head += _element_size(KV_SCALE_DTYPE)
    return num_layers * 2 * num_kv_heads * per_head


def allocate_kv_pool(
    num_layers: int, total_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | QuantizedKVCache:
    """The pool tensor, or for dtype torch.int8 a QuantizedKVCache (int8 values plus their scales).
    The extra last slot is a scratch target for padded tokens (CUDA graph batches)."""
    if dtype == torch.int8:
        values = _zeros((num_layers, total_slots + 1, 2 * num_kv_heads, head_dim), torch.int8, device)
        scales = _zeros((num_layers, total_slots + 1, 2 * num_kv_heads), KV_SCALE_DTYPE, device)
        return QuantizedKVCache(values, scales)
    return _zeros((num_layers, total_slots + 1, 2 * num_kv_heads, head_dim), dtype, device)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        # anonymous mmap: zero by definition, and a page takes RAM only once a token's K/V is
        # written to it. torch.zeros would commit the whole pool up front (LazyLLM's default
        # max_total_token_num=64000 is 2.8 GiB for SmolLM2-135M in float32, mostly never used).
        nbytes = math.prod(shape) * _element_size(dtype)
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)
    return torch.zeros(shape, dtype=dtype, device=device)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import psutil

    return psutil.virtual_memory().available


def profiled_slot_count(device: torch.device, mem_fraction: float, bytes_per_token: int, cap: int,
                        reserve_bytes: int = 0) -> int:
    """Slots that fit in mem_fraction of the memory left free after the warm-up forward, less
    `reserve_bytes` that a forward allocates and frees again (a MoE kernel's workspace).

    On CUDA the warm-up's activations were freed back to torch's cache, so free memory is
    what the pool may take. `cap` bounds the pool where a larger one could never be used
    (every request at its maximum length).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    slots = int(max(0, free_memory_bytes(device) - reserve_bytes) * mem_fraction) // bytes_per_token
    return max(1, min(slots, cap))
