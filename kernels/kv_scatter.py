"""Write the new tokens' K and V into their slots of one layer's KV pool."""

from __future__ import annotations

import torch

from lightllm_plugin.kernels._triton import jit, next_pow2, tl, use_triton


def kv_scatter_ref(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    # kv_layer: [slots+1, 2*Hkv, D]; k, v: [T, Hkv, D]; slots: [T]
    kv_heads = k.shape[1]
    kv_layer[slots, :kv_heads] = k.to(kv_layer.dtype)
    kv_layer[slots, kv_heads:] = v.to(kv_layer.dtype)


@jit
def _kv_scatter_kernel(
    KV, K, V, SLOTS,
    kv_heads, D,
    stride_kvs, stride_kvh, stride_kt, stride_kh, stride_vt, stride_vh,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per new token: its K and V rows land in one slot, next to each other
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < kv_heads)[:, None] & (dims < D)[None, :]
    k = tl.load(K + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    dst = KV + slot * stride_kvs + heads[:, None] * stride_kvh + dims[None, :]
    tl.store(dst, k, mask=mask)
    tl.store(dst + kv_heads * stride_kvh, v, mask=mask)


def kv_scatter(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    if kv_layer.shape[1] != 2 * k.shape[1] or k.shape != v.shape or k.shape[0] != slots.shape[0]:
        raise ValueError(
            f"kv_scatter: kv_layer {tuple(kv_layer.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"slots {tuple(slots.shape)} do not fit together"
        )
    strided_ok = kv_layer.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    if not (use_triton(kv_layer) and strided_ok):
        kv_scatter_ref(kv_layer, k, v, slots)
        return
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    slots = slots if slots.is_contiguous() else slots.contiguous()
    _kv_scatter_kernel[(tokens,)](
        kv_layer, k, v, slots,
        kv_heads, head_dim,
        kv_layer.stride(0), kv_layer.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_H=next_pow2(kv_heads), BLOCK_D=next_pow2(head_dim), num_warps=4,
    )
