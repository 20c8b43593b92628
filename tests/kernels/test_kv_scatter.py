import pytest
import torch
from support.kernel_check import DTYPES, check_int8_scatter

from lightllm_plugin.kernels.kv_scatter import kv_scatter, kv_scatter_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kv_heads,head_dim", [(1, 1, 64), (17, 2, 128), (300, 8, 64), (5, 3, 96)])
def test_kv_scatter_matches_reference(dtype, tokens, kv_heads, head_dim):
    g = torch.Generator().manual_seed(tokens * kv_heads)
    pool_slots = 4 * tokens + 10
    pool = torch.randn(pool_slots + 1, 2 * kv_heads, head_dim, generator=g).to(dtype)
    # scattered, unordered slots, as a fragmented pool hands them out
    slots = torch.randperm(pool_slots, generator=g)[:tokens] + 1
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    ref = pool.clone()
    kv_scatter_ref(ref, k, v, slots)
    kv_scatter(pool, k, v, slots)
    # a copy: exact, untouched slots included
    assert torch.equal(pool, ref)


def test_kv_scatter_from_strided_qkv_views():
    g = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, d = 9, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    k = qkv[:, heads * d : (heads + kv_heads) * d].reshape(tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].reshape(tokens, kv_heads, d)
    pool = torch.randn(40, 2 * kv_heads, d, generator=g)
    slots = torch.tensor([3, 39, 1, 7, 20, 21, 5, 30, 11])
    ref = pool.clone()
    kv_scatter_ref(ref, k, v, slots)
    kv_scatter(pool, k, v, slots)
    assert torch.equal(pool, ref)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        kv_scatter(torch.zeros(4, 4, 8), torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), torch.zeros(2, dtype=torch.long))


def _int8_pool(pool_slots, kv_heads, head_dim, g):
    # stale contents everywhere, so untouched slots can be checked
    values = torch.randint(-127, 128, (pool_slots + 1, 2 * kv_heads, head_dim), generator=g, dtype=torch.int8)
    scales = torch.rand(pool_slots + 1, 2 * kv_heads, generator=g).to(torch.float16)
    return values, scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kv_heads,head_dim", [(1, 1, 64), (17, 2, 128), (300, 8, 64), (5, 3, 96)])
def test_int8_kv_scatter_quantizes_within_half_a_step(dtype, tokens, kv_heads, head_dim):
    g = torch.Generator().manual_seed(tokens * kv_heads + 1)
    pool_slots = 4 * tokens + 10
    values, scales = _int8_pool(pool_slots, kv_heads, head_dim, g)
    slots = torch.randperm(pool_slots, generator=g)[:tokens] + 1
    # heads of very different magnitudes, one outlier per row, and one all-zero head
    mag = torch.logspace(-3, 1, kv_heads)[None, :, None]
    k = (torch.randn(tokens, kv_heads, head_dim, generator=g) * mag).to(dtype)
    v = (torch.randn(tokens, kv_heads, head_dim, generator=g) * mag).to(dtype)
    k[:, :, 3] *= 8
    v[0, 0] = 0
    orig = check_int8_scatter(values, scales, k, v, slots)
    # the largest element of each (not tiny) head maps onto +-127: the full int8 range is used
    big = orig.abs().amax(-1) > 0.01
    assert (values[slots].abs().amax(-1)[big] == 127).all()
    assert torch.count_nonzero(values[slots][0, kv_heads]) == 0


def test_int8_kv_scatter_needs_matching_scales():
    values = torch.zeros(4, 4, 8, dtype=torch.int8)
    k = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError):
        kv_scatter(values, k, k, torch.tensor([1, 2]), torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(ValueError):
        kv_scatter(torch.zeros(4, 4, 8), k, k, torch.tensor([1, 2]), torch.zeros(4, 4, dtype=torch.float16))
