import pytest
import torch
from support.kernel_check import DTYPES, assert_close

from lightllm_plugin.kernels.rmsnorm import rmsnorm, rmsnorm_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (17, 1000), (300, 256), (5, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(dtype, tokens, hidden, with_residual):
    g = torch.Generator().manual_seed(tokens * hidden)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    res = torch.randn(tokens, hidden, generator=g).to(dtype) if with_residual else None
    out, new_res = rmsnorm(x, w, 1e-6, res)
    ref, ref_res = rmsnorm_ref(x, w, 1e-6, res)
    assert_close(out, ref, dtype)
    assert_close(new_res, ref_res, dtype)
    if res is None:
        assert new_res is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(3, 64), (16, 128)])
def test_per_head_norm_on_a_strided_qkv_view(dtype, heads, head_dim):
    # Qwen3's q/k norm: x is a [T, H, D] view into the fused qkv projection output
    g = torch.Generator().manual_seed(heads)
    tokens, kv_heads = 19, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    w = (1 + 0.1 * torch.randn(head_dim, generator=g)).to(dtype)
    for t in (q, k):
        assert not t.is_contiguous()
        out, _ = rmsnorm(t, w, 1e-6)
        assert_close(out, rmsnorm_ref(t, w, 1e-6)[0], dtype)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        rmsnorm(torch.randn(2, 8), torch.ones(4), 1e-6)
