"""The attention prologue of a decoder layer in one launch: the optional per-head RMSNorm of q and
k (Qwen3's q_norm/k_norm), the rotary embedding of q and k, and the new tokens' K and V written
into their slots of one layer's (full-precision) KV pool. Returns q, rotated, as [T, H, D].

Unfused these are up to four launches a layer (q norm, k norm, rotary, kv_scatter) of a few
microseconds each, most of it launch latency at batch-1 decode. The arithmetic is the unfused
ops': float32 statistics, the normalized value rounded to the storage dtype before the weight
multiply and again after it (where rmsnorm stores and rotary reloads it), the rotation in float32
rounded once. Only the norm's sum of squares is added up in another order (two halves), so a
result may differ from the unfused one in the last bit of the storage dtype.

An int8 pool is written by kv_scatter, which quantizes; this op covers the other pools. Without
Triton (CPU) it runs the separate ops.
"""

from __future__ import annotations

import torch

from lightllm_plugin.kernels._triton import jit, next_pow2, tl, use_triton
from lightllm_plugin.kernels.kv_scatter import kv_scatter, kv_scatter_ref
from lightllm_plugin.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from lightllm_plugin.kernels.rotary import rotary, rotary_ref


def _split(qkv: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int):
    q_size, kv_size = num_heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_size].reshape(-1, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(-1, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].reshape(-1, kv_heads, head_dim)
    return q, k, v


def qk_rope_store_ref(
    qkv: torch.Tensor,  # [T, (H + 2 Hkv) D]: q heads, then k heads, then v heads
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None,  # [D] or None (no per-head norm)
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,  # [T, D/2]
    sin: torch.Tensor,
    kv_layer: torch.Tensor,  # [slots+1, 2 Hkv, D]
    slots: torch.Tensor,  # [T]
) -> torch.Tensor:
    q, k, v = _split(qkv, num_heads, kv_heads, head_dim)
    if q_norm is not None:
        q, k = rmsnorm_ref(q, q_norm, eps)[0], rmsnorm_ref(k, k_norm, eps)[0]
    else:
        q, k = q.clone(), k.clone()
    rotary_ref(q, k, cos, sin)
    kv_scatter_ref(kv_layer, k, v, slots)
    return q


def qk_rope_store_separate(qkv, num_heads, kv_heads, head_dim, q_norm, k_norm, eps, cos, sin, kv_layer, slots,
                           kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """qk_rope_store as separate ops, each with its own CPU path (those are tuned for the CPU
    engine's decode); kv_scale: an int8 pool's scales, quantized by kv_scatter as written."""
    q, k, v = _split(qkv, num_heads, kv_heads, head_dim)
    if q_norm is not None:
        q, k = rmsnorm(q, q_norm, eps)[0], rmsnorm(k, k_norm, eps)[0]
    else:
        q, k = q.contiguous(), k.contiguous()
    rotary(q, k, cos, sin)
    kv_scatter(kv_layer, k, v, slots, kv_scale)
    return q


@jit
def _prologue_heads(
    X, n_heads, HALF, D, W, eps, cos, sin, OUT, stride_oh,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # X: one token's first head of this kind (heads D apart); cos/sin: its [BLOCK_HALF] rows in float32
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF
    if HAS_NORM:
        w1 = tl.load(W + dims, mask=dmask, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & dmask[None, :]
        lo = X + heads[:, None] * D + dims[None, :]
        x1 = tl.load(lo, mask=mask, other=0.0)
        x2 = tl.load(lo + HALF, mask=mask, other=0.0)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        if HAS_NORM:
            rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / D + eps)
            x1f = ((x1f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]).to(x1.dtype).to(tl.float32)
            x2f = ((x2f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w2[None, :]).to(x1.dtype).to(tl.float32)
        out = OUT + heads[:, None] * stride_oh + dims[None, :]
        ty = OUT.dtype.element_ty
        tl.store(out, (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype).to(ty), mask=mask)
        tl.store(out + HALF, (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype).to(ty), mask=mask)


@jit
def _qk_rope_store_kernel(
    QKV, QW, KW, COS, SIN, QOUT, KV, SLOTS,
    num_heads, kv_heads, HALF, D, eps,
    stride_t, stride_ct, stride_st, stride_qo_t, stride_qo_h, stride_kvs, stride_kvh,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per token: its cos/sin row is loaded once for all of its q and k heads
    t = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + t * stride_ct + half, mask=half < HALF, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * stride_st + half, mask=half < HALF, other=0.0).to(tl.float32)
    row = QKV + t * stride_t
    _prologue_heads(row, num_heads, HALF, D, QW, eps, cos, sin, QOUT + t * stride_qo_t, stride_qo_h,
                    HAS_NORM, BLOCK_H, BLOCK_HALF)
    dst = KV + tl.load(SLOTS + t).to(tl.int64) * stride_kvs
    _prologue_heads(row + num_heads * D, kv_heads, HALF, D, KW, eps, cos, sin, dst, stride_kvh,
                    HAS_NORM, BLOCK_H, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_KV)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < kv_heads)[:, None] & (dims < D)[None, :]
    v = tl.load(row + (num_heads + kv_heads) * D + heads[:, None] * D + dims[None, :], mask=mask)
    tl.store(dst + (kv_heads + heads)[:, None] * stride_kvh + dims[None, :], v.to(KV.dtype.element_ty), mask=mask)


def qk_rope_store(
    qkv: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """q rotated [T, H, D] (q/k normed first when q_norm and k_norm are given); K and V of each
    token written to kv_layer[slots[t]]. Arguments as qk_rope_store_ref's."""
    tokens = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qk_rope_store: qkv {tuple(qkv.shape)} is not {num_heads} + 2 x {kv_heads} heads of {head_dim}")
    if cos.shape != (tokens, head_dim // 2) or sin.shape != cos.shape or slots.shape != (tokens,):
        raise ValueError(f"qk_rope_store: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, slots {tuple(slots.shape)} "
                         f"do not match {tokens} tokens of head_dim {head_dim}")
    if kv_layer.dim() != 3 or kv_layer.shape[1:] != (2 * kv_heads, head_dim) or kv_layer.dtype == torch.int8:
        raise ValueError(f"qk_rope_store: kv_layer {kv_layer.dtype} {tuple(kv_layer.shape)} is not a full-precision "
                         f"[slots+1, {2 * kv_heads}, {head_dim}] pool")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("qk_rope_store: q_norm and k_norm come together")
    if not (use_triton(qkv) and qkv.stride(-1) == 1 and kv_layer.stride(-1) == 1):
        return qk_rope_store_separate(qkv, num_heads, kv_heads, head_dim, q_norm, k_norm, eps, cos, sin, kv_layer, slots)
    q_out = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q_out
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    slots = slots if slots.is_contiguous() else slots.contiguous()
    half = head_dim // 2
    block_half = next_pow2(half)
    block_h = min(next_pow2(max(num_heads, kv_heads)), max(1, 4096 // block_half))
    has_norm = q_norm is not None
    _qk_rope_store_kernel[(tokens,)](
        qkv, q_norm.contiguous() if has_norm else qkv, k_norm.contiguous() if has_norm else qkv, cos, sin,
        q_out, kv_layer, slots,
        num_heads, kv_heads, half, head_dim, eps,
        qkv.stride(0), cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1),
        HAS_NORM=has_norm, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_KV=next_pow2(kv_heads), BLOCK_D=next_pow2(head_dim), num_warps=4,
    )
    return q_out
