"""Shared comparison for the kernel tests (interpreter and GPU): relative error against the reference."""

import torch

from lightllm_plugin.kernels.kv_scatter import kv_scatter, kv_scatter_ref
from lightllm_plugin.kernels.token_attention import token_attention_ref

# ‖out − ref‖ / ‖ref‖ bounds per storage dtype
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# int8 K/V (per-token-per-head absmax scales, error <= scale/2 = absmax/254 per element) against
# full-precision K/V, for random Gaussian inputs: ‖out_int8 − out_fp32‖/‖out_fp32‖ bound.
# Measured 0.5-0.8% (float32 and bfloat16 storage alike); the bound is 2%.
INT8_VS_FULL_TOL = 2e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    err = rel_err(out, ref)
    bound = TOL[dtype] if tol is None else tol
    assert err <= bound, f"relative error {err:.3g} > {bound:.1g} ({dtype})"


def make_batch(seq_lens, q_lens, heads, kv_heads, head_dim, dtype, seed, device="cpu"):
    """A KV pool with scattered, shuffled slots and request rows out of order, as a busy engine has."""
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    pool_slots = 2 * total + 7
    kv_layer = torch.randn(pool_slots + 1, 2 * kv_heads, head_dim, generator=g).to(dtype)
    max_len = max(seq_lens) + 5
    rows = torch.randperm(len(seq_lens) + 3, generator=g)[: len(seq_lens)]
    req_to_token = torch.randint(0, pool_slots + 1, (len(seq_lens) + 3, max_len), generator=g, dtype=torch.int32)
    perm = torch.randperm(pool_slots, generator=g) + 1
    used = 0
    for row, n in zip(rows.tolist(), seq_lens):
        req_to_token[row, :n] = perm[used : used + n].to(torch.int32)
        used += n
    q_start = torch.tensor([0] + list(q_lens[:-1])).cumsum(0)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype)
    meta = (req_to_token, rows.long(), torch.tensor(seq_lens), q_start.long(), torch.tensor(q_lens))
    return q.to(device), kv_layer.to(device), tuple(m.to(device) for m in meta)


def check_int8_scatter(values, scales, k, v, slots) -> torch.Tensor:
    """kv_scatter into an int8 pool stores the reference's bytes exactly (untouched slots
    included), and every element dequantizes to within half a step of its value. Returns the
    original K/V of the written slots, as float32 [tokens, 2*kv_heads, head_dim]."""
    ref_values, ref_scales = values.clone(), scales.clone()
    kv_scatter_ref(ref_values, k, v, slots, ref_scales)
    kv_scatter(values, k, v, slots, scales)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(values, ref_values)
    deq = values[slots].float() * scales[slots].float()[..., None]
    orig = torch.cat([k, v], dim=1).float()
    step = scales[slots].float()[..., None]
    assert ((deq - orig).abs() <= step / 2 + 1e-7 * orig.abs()).all()
    return orig


def check_int8_attention(out, q, kv, values, scales, meta, scale, dtype, tol=None) -> tuple[float, float]:
    """An int8-pool attention output against the int8 reference (within `tol`, default TOL), and
    the int8 reference and the output against full-precision K/V (within INT8_VS_FULL_TOL).
    Returns the output's relative errors (against the int8 reference, against full precision)."""
    ref = token_attention_ref(q, values, *meta, scale, kv_scale=scales)
    assert_close(out, ref, dtype, tol)
    full = token_attention_ref(q.float(), kv.float(), *meta, scale)
    assert_close(ref, full, dtype, INT8_VS_FULL_TOL)
    assert_close(out, full, dtype, INT8_VS_FULL_TOL)
    return rel_err(out, ref), rel_err(out, full)
