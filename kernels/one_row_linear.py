"""One-row linear y = x W^T (+ b): the matmul of a batch-1 decode step.

cuBLAS reads some one-row shapes well below the device's copy rate (on an H100, Llama-3-8B's
4096x4096 o_proj at ~1.6 TB/s against ~2.9 TB/s for the other projections), and at batch 1
every weight byte is the step's cost. This kernel streams W in row blocks with fp32
accumulation. Whether it beats cuBLAS depends on the shape and the device, so on CUDA both are
timed once per weight shape (never during graph capture) and the faster one is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightllm_plugin.kernels._triton import INTERPRETED, cdiv, jit, tl, use_triton

# (rows per program, columns per load, warps), tried in this order
_CONFIGS = ((16, 512, 4), (8, 512, 4), (32, 256, 4), (16, 1024, 8), (4, 1024, 4))
# weight shape, dtype, device -> the config that beat cuBLAS, or None where cuBLAS won
_chosen: dict[tuple, tuple[int, int, int] | None] = {}


def one_row_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@jit
def _one_row_linear_kernel(X, W, OUT, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(X + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(OUT + rows, tl.sum(acc, axis=1).to(OUT.dtype.element_ty), mask=row_mask)


def _launch(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int]) -> torch.Tensor:
    n, k = weight.shape
    block_n, block_k, warps = config
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _one_row_linear_kernel[(cdiv(n, block_n),)](x, weight, out, n, k, weight.stride(0),
                                                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


def _pick(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int] | None:
    """The fastest config, or None when cuBLAS is at least as fast (L2 flushed between runs, as
    a decode step's weights are not cache-resident)."""
    from triton.testing import do_bench as bench

    best_ms, best = bench(lambda: F.linear(x, weight)), None
    for config in _CONFIGS:
        ms = bench(lambda: _launch(x, weight, config))
        if ms < best_ms:
            best_ms, best = ms, config
    return best


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the kernel when x is one row and the kernel is the faster of the two."""
    if x.dim() != 2 or x.shape[0] != 1 or x.dtype != weight.dtype or weight.stride(-1) != 1 or not use_triton(x):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    if INTERPRETED:
        config = _CONFIGS[0]
    else:
        key = (tuple(weight.shape), weight.dtype, weight.device)
        if key not in _chosen:
            if torch.cuda.is_current_stream_capturing():
                return F.linear(x, weight, bias)
            _chosen[key] = _pick(x, weight)
        config = _chosen[key]
        if config is None:
            return F.linear(x, weight, bias)
    out = _launch(x, weight, config)
    return out if bias is None else out + bias
