import pytest
import torch
from support.kernel_check import DTYPES, assert_close

from lightllm_plugin.kernels.rotary import rotary, rotary_ref


def _cos_sin(positions: torch.Tensor, head_dim: int):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(positions.float(), inv_freq)
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 4, 64), (17, 8, 2, 128), (300, 6, 1, 64), (9, 5, 5, 96)])
def test_rotary_matches_reference(dtype, tokens, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(tokens + heads)
    q = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    cos, sin = _cos_sin(torch.randint(0, 4096, (tokens,), generator=g), head_dim)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_ref(q_ref, k_ref, cos, sin)
    rotary(q, k, cos, sin)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)


def test_rotary_on_strided_views_writes_through():
    # the model hands over views into one fused buffer; the rotation must land in that buffer
    g = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, d = 7, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    ref = qkv.clone()
    views = [b[:, : (heads + kv_heads) * d].reshape(tokens, heads + kv_heads, d) for b in (qkv, ref)]
    cos, sin = _cos_sin(torch.arange(tokens), d)
    rotary(views[0][:, :heads], views[0][:, heads:], cos, sin)
    rotary_ref(views[1][:, :heads], views[1][:, heads:], cos, sin)
    assert_close(qkv, ref, torch.float32)
