"""Shared comparison for the kernel tests: relative error against the reference."""

import torch

# ‖out − ref‖ / ‖ref‖ bounds per storage dtype
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    err = rel_err(out, ref)
    bound = TOL[dtype] if tol is None else tol
    assert err <= bound, f"relative error {err:.3g} > {bound:.1g} ({dtype})"
