"""RMSNorm with an optional fused residual add.

`rmsnorm(x, weight, eps, residual)` returns (normed, new_residual) where
new_residual = x + residual (or x when residual is None), matching a pre-norm
decoder layer: the residual stream is updated and normalized in one pass.
"""

from __future__ import annotations

import torch


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    residual_out = x
    # float32 statistics whatever the storage dtype, as HF's LlamaRMSNorm does
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), residual_out


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: hidden size {x.shape[-1]} != weight size {weight.shape[0]}")
    return rmsnorm_ref(x, weight, eps, residual)
