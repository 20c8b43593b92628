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
