"""Write the new tokens' K and V into their slots of one layer's KV pool.

With an int8 pool (`kv_scale` given) each token's K and V rows are quantized on the way in:
symmetric, one scale per (token, kv head), scale = absmax / 127 rounded to the scale tensor's
dtype (float16), value = round-half-up(x / scale) clamped to [-127, 127]. Quantizing with the
stored (rounded) scale keeps |dequantized - x| <= scale / 2 for every element.
"""

from __future__ import annotations

import torch

from lightllm_plugin.kernels._triton import jit, next_pow2, tl, use_triton

# float16's smallest normal number: a head whose absmax is below 127 * this (about 0.008) is
# stored with this step instead, so a scale never flushes to zero or loses bits as a subnormal
KV_SCALE_MIN = 2.0**-14


def quantize_kv_ref(x: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, D] -> int8 values [T, H, D] and scales [T, H]; dequantize as values * scales[..., None]."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / 127.0).clamp(min=KV_SCALE_MIN).to(scale_dtype)
    q = torch.floor(xf / scale.float()[..., None] + 0.5).clamp(-127, 127).to(torch.int8)
    return q, scale


def kv_scatter_ref(
    kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None
) -> None:
    # kv_layer: [slots+1, 2*Hkv, D]; k, v: [T, Hkv, D]; slots: [T]; kv_scale: [slots+1, 2*Hkv] (int8 pool)
    kv_heads = k.shape[1]
    if kv_scale is not None:
        (k, k_scale), (v, v_scale) = quantize_kv_ref(k, kv_scale.dtype), quantize_kv_ref(v, kv_scale.dtype)
        kv_scale[slots, :kv_heads] = k_scale
        kv_scale[slots, kv_heads:] = v_scale
    kv_layer[slots, :kv_heads] = k.to(kv_layer.dtype)
    kv_layer[slots, kv_heads:] = v.to(kv_layer.dtype)


@jit
def _quantize_rows(x, SCALE_MIN: tl.constexpr, SCALE_TY: tl.constexpr):
    # x: [BLOCK_H, BLOCK_D] float32, zero where masked; one scale per row (kv head)
    absmax = tl.max(tl.abs(x), axis=1)
    # div_rn, not `/` (an approximate division on GPUs): the same bits as the torch reference
    scale = tl.maximum(tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32)), SCALE_MIN).to(SCALE_TY)
    q = tl.floor(tl.div_rn(x, scale.to(tl.float32)[:, None]) + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return q.to(tl.int8), scale


@jit
def _kv_scatter_kernel(
    KV, K, V, SLOTS, KS,
    kv_heads, D,
    stride_kvs, stride_kvh, stride_kt, stride_kh, stride_vt, stride_vh, stride_kss,
    QUANT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
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
    if QUANT:
        zero = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        scale_ty = KS.dtype.element_ty
        k, k_scale = _quantize_rows(tl.where(mask, k.to(tl.float32), zero), 2.0**-14, scale_ty)
        v, v_scale = _quantize_rows(tl.where(mask, v.to(tl.float32), zero), 2.0**-14, scale_ty)
        h_ok = heads < kv_heads
        tl.store(KS + slot * stride_kss + heads, k_scale, mask=h_ok)
        tl.store(KS + slot * stride_kss + kv_heads + heads, v_scale, mask=h_ok)
    tl.store(dst, k, mask=mask)
    tl.store(dst + kv_heads * stride_kvh, v, mask=mask)


def kv_scatter(
    kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None
) -> None:
    """`kv_scale` ([slots+1, 2*Hkv]) marks an int8 `kv_layer`: K and V are quantized as they are written."""
    if kv_layer.shape[1] != 2 * k.shape[1] or k.shape != v.shape or k.shape[0] != slots.shape[0]:
        raise ValueError(
            f"kv_scatter: kv_layer {tuple(kv_layer.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"slots {tuple(slots.shape)} do not fit together"
        )
    if kv_scale is not None and (kv_layer.dtype != torch.int8 or kv_scale.shape != kv_layer.shape[:2]):
        raise ValueError(f"kv_scatter: scales {tuple(kv_scale.shape)} need an int8 pool of [slots+1, 2*Hkv, D], "
                         f"got {kv_layer.dtype} {tuple(kv_layer.shape)}")
    strided_ok = kv_layer.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    if kv_scale is not None:
        strided_ok = strided_ok and kv_scale.stride(-1) == 1
    if not (use_triton(kv_layer) and strided_ok):
        if kv_scale is None and kv_layer.device.type == "cpu":
            # one row copy per token for K and V together (the reference writes them apart)
            kv_layer.index_copy_(0, slots, torch.cat([k, v], dim=1).to(kv_layer.dtype))
        else:
            kv_scatter_ref(kv_layer, k, v, slots, kv_scale)
        return
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    slots = slots if slots.is_contiguous() else slots.contiguous()
    _kv_scatter_kernel[(tokens,)](
        kv_layer, k, v, slots, kv_scale if kv_scale is not None else kv_layer,
        kv_heads, head_dim,
        kv_layer.stride(0), kv_layer.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_scale.stride(0) if kv_scale is not None else 0,
        QUANT=kv_scale is not None, BLOCK_H=next_pow2(kv_heads), BLOCK_D=next_pow2(head_dim), num_warps=4,
    )
