"""Rotary position embedding applied in place to packed q and k.

Uses the half-split layout of Hugging Face Llama (rotate_half): dimension i pairs
with i + head_dim/2. cos/sin are gathered per token from a cache built by the model,
so rope scaling variants (linear, llama3, GGUF frequency factors) live in that cache
and this kernel only applies it.
"""

from __future__ import annotations

import torch

from lightllm_plugin.kernels._triton import jit, next_pow2, tl, use_triton


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # q: [T, H, D], k: [T, Hkv, D], cos/sin: [T, D/2]
    cos = cos[:, None, :].to(torch.float32)
    sin = sin[:, None, :].to(torch.float32)
    q.copy_(_rotate(q.float(), cos, sin).to(q.dtype))
    k.copy_(_rotate(k.float(), cos, sin).to(k.dtype))


@jit
def _rotate_heads(X, stride_h, n_heads, cos, sin, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # X points at one token's first head; cos/sin are that token's [BLOCK_HALF] rows in float32
    dims = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & (dims < HALF)[None, :]
        lo = X + heads[:, None] * stride_h + dims[None, :]
        x1 = tl.load(lo, mask=mask, other=0.0)
        x2 = tl.load(lo + HALF, mask=mask, other=0.0)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(lo, (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
        tl.store(lo + HALF, (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype), mask=mask)


@jit
def _rotary_kernel(
    Q, K, COS, SIN,
    num_heads, kv_heads, HALF,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # one program per token: its cos/sin row is loaded once for all of its q and k heads
    t = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + t * stride_ct + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * stride_st + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    _rotate_heads(Q + t * stride_qt, stride_qh, num_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(K + t * stride_kt, stride_kh, kv_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)


def _rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    tokens, num_heads, head_dim = q.shape
    if tokens == 0:
        return
    half = head_dim // 2
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    block_half = next_pow2(half)
    block_h = min(next_pow2(max(num_heads, k.shape[1])), max(1, 4096 // block_half))
    _rotary_kernel[(tokens,)](
        q, k, cos, sin,
        num_heads, k.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
    )


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.shape[0] != cos.shape[0] or q.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"rotary: q {tuple(q.shape)} does not match cos {tuple(cos.shape)}")
    if k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1] or sin.shape != cos.shape:
        raise ValueError(f"rotary: k {tuple(k.shape)} / sin {tuple(sin.shape)} do not match q {tuple(q.shape)}")
    if use_triton(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        _rotary_triton(q, k, cos, sin)
    elif q.dtype == k.dtype == cos.dtype == sin.dtype == torch.float32:
        cos, sin = cos[:, None, :], sin[:, None, :]
        _rotate_in_place(q, cos, sin)
        _rotate_in_place(k, cos, sin)
    else:
        rotary_ref(q, k, cos, sin)


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # float32 only: rotary_ref's products and sums in the same order (the same bits), with fewer
    # temporaries and Python calls, which is most of what a CPU decode step costs
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    first = x1 * cos - x2 * sin
    x2.mul_(cos).add_(x1 * sin)
    x1.copy_(first)
