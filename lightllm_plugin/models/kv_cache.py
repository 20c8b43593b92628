"""What the model's attention reads and writes: the KV pool (one tensor, or its int8 form with
scales) and the metadata saying where each token's K/V goes. The engine allocates both; the
model only indexes them, so they live here, below both."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# int8 KV cache (--kv_cache_dtype int8): one scale per (token, kv head) for K and one for V.
# float16, not float32: at head_dim 64 a float32 scale pair costs 8 bytes against the 128 bytes
# of int8 K+V per head, which leaves 1.88x the bf16 slot count; float16 gives 1.94x (head_dim 128:
# 1.97x). float16's 11-bit significand only rounds the scale itself, and the kv-scatter kernel
# quantizes with the rounded scale, so the error stays within scale/2 of what is stored.
KV_SCALE_DTYPE = torch.float16


@dataclass
class QuantizedKVCache:
    """The int8 KV pool: `values` laid out as the full-precision pool, `scales` one entry per
    (slot, K-or-V head). Indexing with a layer number gives that layer's pair, as the
    full-precision pool tensor gives its layer, so the model passes either one along."""

    values: torch.Tensor  # int8 [layers, slots+1, 2*Hkv, D] (or one layer: [slots+1, 2*Hkv, D])
    scales: torch.Tensor  # KV_SCALE_DTYPE [layers, slots+1, 2*Hkv] (or [slots+1, 2*Hkv])

    def __getitem__(self, layer: int) -> "QuantizedKVCache":
        return QuantizedKVCache(self.values[layer], self.scales[layer])

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * self.scales.element_size()


@dataclass
class AttentionMetadata:
    """Where each packed token's K/V goes and which slots each request attends to."""

    req_to_token: torch.Tensor  # [max_reqs, max_len]
    b_req_idx: torch.Tensor  # [B]
    b_seq_len: torch.Tensor  # [B] tokens in KV after this step
    b_q_start: torch.Tensor  # [B]
    b_q_len: torch.Tensor  # [B]
    out_slots: torch.Tensor  # [T] slot of each new token
