"""Write the new tokens' K and V into their slots of one layer's KV pool."""

from __future__ import annotations

import torch


def kv_scatter_ref(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    # kv_layer: [slots+1, 2*Hkv, D]; k, v: [T, Hkv, D]; slots: [T]
    kv_heads = k.shape[1]
    kv_layer[slots, :kv_heads] = k.to(kv_layer.dtype)
    kv_layer[slots, kv_heads:] = v.to(kv_layer.dtype)


def kv_scatter(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    if kv_layer.shape[1] != 2 * k.shape[1] or k.shape != v.shape or k.shape[0] != slots.shape[0]:
        raise ValueError(
            f"kv_scatter: kv_layer {tuple(kv_layer.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"slots {tuple(slots.shape)} do not fit together"
        )
    kv_scatter_ref(kv_layer, k, v, slots)
