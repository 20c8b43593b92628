import pytest
import torch
import torch.nn.functional as F
from support.kernel_check import DTYPES, assert_close

from lightllm_plugin.kernels.one_row_linear import one_row_linear, one_row_linear_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(64, 128), (1000, 300), (17, 1030), (256, 2048)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_one_row_linear_matches_reference(dtype, n, k, with_bias):
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    assert_close(one_row_linear(x, w, b), one_row_linear_ref(x, w, b), dtype)


def test_more_rows_and_strided_weights_take_the_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    assert torch.equal(one_row_linear(x, w), F.linear(x, w))
    wt = torch.randn(64, 32, generator=g).t()  # column-major view
    assert torch.equal(one_row_linear(x[:1], wt), F.linear(x[:1], wt))
