import pytest
import torch
from support.kernel_check import DTYPES, assert_close

from lightllm_plugin.kernels.qk_rope_store import qk_rope_store, qk_rope_store_ref


def _inputs(dtype, tokens, heads, kv_heads, head_dim, norm, seed, row_pad=0):
    g = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    # row_pad > 0: qkv is a view with a row stride wider than its row (a slice of a wider buffer)
    qkv = torch.randn(tokens, width + row_pad, generator=g).to(dtype)[:, :width]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.randint(0, 4096, (tokens,), generator=g).float(), inv_freq)
    weights = [(1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype) for _ in range(2)] if norm else [None, None]
    pool_slots = 3 * tokens + 9
    pool = torch.randn(pool_slots + 1, 2 * kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(pool_slots, generator=g)[:tokens] + 1
    return qkv, weights, freqs.cos(), freqs.sin(), pool, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 16, 8, 128), (17, 8, 2, 64), (9, 6, 1, 96)])
def test_qk_rope_store_matches_the_unfused_ops(dtype, norm, tokens, heads, kv_heads, head_dim):
    qkv, (qw, kw), cos, sin, pool, slots = _inputs(dtype, tokens, heads, kv_heads, head_dim, norm, tokens + heads,
                                                   row_pad=head_dim if tokens > 1 else 0)
    ref_pool = pool.clone()
    q_ref = qk_rope_store_ref(qkv, heads, kv_heads, head_dim, qw, kw, 1e-6, cos, sin, ref_pool, slots)
    before = qkv.clone()
    q = qk_rope_store(qkv, heads, kv_heads, head_dim, qw, kw, 1e-6, cos, sin, pool, slots)
    assert q.shape == (tokens, heads, head_dim) and q.is_contiguous()
    assert torch.equal(qkv, before)  # the projection's output is only read
    assert_close(q, q_ref, dtype)
    assert_close(pool[slots], ref_pool[slots], dtype)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(pool[untouched], ref_pool[untouched])
    # V is copied, not computed: exact
    assert torch.equal(pool[slots, kv_heads:], ref_pool[slots, kv_heads:])


def test_bad_shapes_and_an_int8_pool_are_rejected():
    qkv, (qw, kw), cos, sin, pool, slots = _inputs(torch.float32, 3, 4, 2, 64, True, 0)
    with pytest.raises(ValueError):
        qk_rope_store(qkv, 4, 1, 64, qw, kw, 1e-6, cos, sin, pool, slots)
    with pytest.raises(ValueError):
        qk_rope_store(qkv, 4, 2, 64, qw, None, 1e-6, cos, sin, pool, slots)
    with pytest.raises(ValueError):
        qk_rope_store(qkv, 4, 2, 64, qw, kw, 1e-6, cos, sin, pool.to(torch.int8), slots)
