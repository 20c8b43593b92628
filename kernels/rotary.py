"""Rotary position embedding applied in place to packed q and k.

Uses the half-split layout of Hugging Face Llama (rotate_half): dimension i pairs
with i + head_dim/2. cos/sin are gathered per token from a cache built by the model.
"""

from __future__ import annotations

import torch


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


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.shape[0] != cos.shape[0] or q.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"rotary: q {tuple(q.shape)} does not match cos {tuple(cos.shape)}")
    rotary_ref(q, k, cos, sin)
