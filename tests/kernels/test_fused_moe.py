import pytest
import torch
from support.kernel_check import DTYPES, assert_close

from lightllm_plugin.kernels.fused_moe import _CONFIGS, fused_moe, fused_moe_ref, moe_route_ref


def _inputs(tokens, hidden, inter, experts, dtype, seed, only_experts=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = 2 * torch.randn(tokens, experts, generator=g)
    if only_experts is not None:  # the other experts get no token
        logits[:, only_experts:] -= 100
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return x, logits.to(dtype), w_gate_up, w_down


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,top_k,renormalize,only", [
    (1, 8, 2, True, None),
    (17, 8, 2, False, None),
    (17, 6, 4, True, 4),  # two experts get no token
    (5, 16, 1, False, 3),
])
def test_fused_moe_matches_reference(dtype, tokens, experts, top_k, renormalize, only):
    x, logits, w1, w2 = _inputs(tokens, 48, 40, experts, dtype, tokens * experts + top_k, only)
    out = fused_moe(x, logits, w1, w2, top_k, renormalize)
    ref = fused_moe_ref(x, logits, w1, w2, top_k, renormalize)
    assert_close(out, ref, dtype)


def test_routing_renormalizes_only_when_asked():
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    w, ids = moe_route_ref(logits, 2, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(9))
    w_raw, ids_raw = moe_route_ref(logits, 2, renormalize=False)
    assert torch.equal(ids, ids_raw)
    assert torch.allclose(w_raw, torch.softmax(logits, -1).gather(1, ids))


@pytest.mark.parametrize("block_config", [c[1:] for c in _CONFIGS])
def test_every_block_config_matches_reference(block_config):
    """The table's tile shapes, each at a size the interpreter runs quickly (some experts empty)."""
    x, logits, w1, w2 = _inputs(33, 64, 72, 8, torch.float32, 7, only_experts=5)
    out = fused_moe(x, logits, w1, w2, 2, False, block_config=block_config)
    assert_close(out, fused_moe_ref(x, logits, w1, w2, 2, False), torch.float32)


@pytest.mark.parametrize("element_size", [2, 4])
def test_every_config_fits_hoppers_shared_memory(element_size):
    """A float32 model's tiles take twice the shared memory: the pipeline gets shallower instead
    of the launch failing (Hopper holds 227 KiB a block)."""
    from lightllm_plugin.kernels.fused_moe import _fit_stages

    for _, bm, bn, bk, _, stages in _CONFIGS:
        fitted = _fit_stages(bm, bn, bk, stages, element_size)
        assert 2 <= fitted <= stages
        assert (fitted - 1) * (bm * bk + 2 * bk * bn) * element_size <= 227 * 1024
