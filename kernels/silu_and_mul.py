"""SiLU-and-mul: the gated MLP activation on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightllm_plugin.kernels._triton import cdiv, jit, tl, use_triton


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@jit
def _silu_and_mul_kernel(GU, OUT, N, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(GU + row * stride_row + cols, mask=mask, other=0.0)
    up = tl.load(GU + row * stride_row + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # rounded to the storage dtype between the two ops, as F.silu(gate) * up is
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(OUT + row * N + cols, act * up.to(tl.float32), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even, got {gate_up.shape[-1]}")
    if not use_triton(gate_up):
        return silu_and_mul_ref(gate_up)
    n = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] and n:
        block = 1024
        _silu_and_mul_kernel[(x.shape[0], cdiv(n, block))](x, out, n, x.stride(0), BLOCK=block, num_warps=4)
    return out
