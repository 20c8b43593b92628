"""RMSNorm with an optional fused residual add.

`rmsnorm(x, weight, eps, residual)` returns (normed, new_residual) where
new_residual = x + residual (or x when residual is None), matching a pre-norm
decoder layer: the residual stream is updated and normalized in one pass.
x may be [T, hidden] or [T, H, D] (Qwen3's per-head q/k norm, where x is a strided
view into the fused qkv output, so the kernel takes strides instead of a copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightllm_plugin.kernels._triton import cdiv, jit, next_pow2, tl, use_triton


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


@jit
def _rmsnorm_kernel(
    X, R, W, OUT, ROUT,
    n_rows, inner, N, eps,
    stride_x0, stride_x1, stride_r0, stride_r1,
    HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # rows are the flattened leading dims [outer, inner]; several short rows per program
    # so that per-head norms (D=128) do not launch one tiny program per (token, head)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)
    outer, within = rows // inner, rows % inner
    x = tl.load(X + (outer * stride_x0 + within * stride_x1)[:, None] + cols[None, :], mask=mask, other=0.0)
    dense = rows[:, None] * N + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(R + (outer * stride_r0 + within * stride_r1)[:, None] + cols[None, :], mask=mask, other=0.0)
        # the sum is rounded to the storage dtype before the statistics, as the unfused add would be
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(ROUT + dense, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    # HF rounds the normalized value to the input dtype before the weight multiply
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(OUT + dense, normed * w[None, :], mask=mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    # [T, N] -> [T, 1, N]; deeper leading dims are flattened (a copy only if they cannot be viewed)
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    return t.reshape(-1, 1, t.shape[-1])


def _rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x3 = _as_3d(x)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    r3 = None
    if residual is not None:
        r3 = _as_3d(residual)
        if r3.stride(-1) != 1:
            r3 = r3.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x
    n_rows = x3.shape[0] * x3.shape[1]
    if n_rows == 0:
        return out, res_out
    block_n = next_pow2(n)
    rows = max(1, min(16, 2048 // block_n))
    num_warps = max(1, min(16, rows * block_n // 256))
    grid = (cdiv(n_rows, rows),)
    _rmsnorm_kernel[grid](
        x3, r3 if r3 is not None else x3, weight, out, res_out,
        n_rows, x3.shape[1], n, eps,
        x3.stride(0), x3.stride(1),
        r3.stride(0) if r3 is not None else 0, r3.stride(1) if r3 is not None else 0,
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, res_out


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: hidden size {x.shape[-1]} != weight size {weight.shape[0]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    if use_triton(x):
        return _rmsnorm_triton(x, weight, eps, residual)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # the reference's arithmetic in torch's composite rms_norm: the same bits, fewer Python calls
        # (on CPU a decode step is mostly per-op overhead)
        if residual is not None:
            x = x + residual
        return F.rms_norm(x, (x.shape[-1],), weight, eps), x
    return rmsnorm_ref(x, weight, eps, residual)
