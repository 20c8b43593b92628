import pytest
import torch
from support.kernel_check import DTYPES, assert_close

from lightllm_plugin.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (17, 1000), (300, 1408), (3, 3000)])
def test_silu_and_mul_matches_reference(dtype, tokens, inter):
    g = torch.Generator().manual_seed(tokens + inter)
    gate_up = (2 * torch.randn(tokens, 2 * inter, generator=g)).to(dtype)
    assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), dtype)


def test_odd_width_is_rejected():
    with pytest.raises(ValueError):
        silu_and_mul(torch.randn(2, 7))
