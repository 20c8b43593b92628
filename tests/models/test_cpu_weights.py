"""The CPU's quantized projections and lm_head (models/cpu_weights.py)."""

import torch
from torch import nn

from lightllm_plugin.models import cpu_weights
from lightllm_plugin.models.cpu_weights import RescoredHead, quantize_projections


def _q4_1_weight(n, k, seed):
    """Values as a GGUF Q4_1 file holds them: per block of 32, minimum + code * scale, codes 0..15
    with both ends used."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-3).half().float()
    low = (torch.randn(n, k // 32, 1, generator=g) * 0.05).half().float()
    return (codes * scale + low).reshape(n, k)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class _Proj(nn.Linear):
    """Stands for the model's projection type: quantize_projections replaces exactly that type."""


def _model(*weights, bias=False):
    model = nn.Module()
    model.projs = nn.ModuleList()
    for w in weights:
        proj = _Proj(w.shape[1], w.shape[0], bias=bias)
        proj.weight.data = w.clone()
        model.projs.append(proj)
    model.lm_head = nn.Linear(16, 100, bias=False)
    return model


def test_4_bit_weights_keep_their_codes_and_only_an_explicit_request_adds_int8():
    # the int4 kernel's layout needs 16 output channels per tile and groups of 32: the third one
    # is 4-bit but does not fit it
    weights = [_q4_1_weight(96, 128, seed=0), torch.randn(96, 128), _q4_1_weight(24, 64, seed=1)]
    auto = _model(*weights)
    assert quantize_projections(auto, _Proj, int8=False) == {"int4": 1, "int8": 0}
    assert [type(p).__name__ for p in auto.projs] == ["QuantizedProjection", "_Proj", "_Proj"]
    assert isinstance(auto.lm_head, RescoredHead)
    explicit = _model(*weights)
    assert quantize_projections(explicit, _Proj, int8=True) == {"int4": 1, "int8": 2}
    assert [p.kind for p in explicit.projs] == ["int4", "int8", "int8"]


def test_few_rows_take_the_kernels_and_many_rows_the_float32_weight():
    model = _model(_q4_1_weight(96, 128, seed=2), torch.randn(96, 128) * 0.05, bias=True)
    quantize_projections(model, _Proj, int8=True)
    for proj in model.projs:
        weight, bias = proj.weight.detach().clone(), proj.bias.detach().clone()
        few = torch.randn(3, 128)
        # bfloat16 rows and scales: within bfloat16's rounding of the float32 product
        assert _rel(proj(few), few @ weight.t() + bias) < 1e-2
        many = torch.randn(cpu_weights.GEMV_MAX_ROWS + 1, 128)
        assert torch.equal(proj(many), torch.nn.functional.linear(many, weight, bias))


def test_the_rescored_head_gives_float32_logits_at_its_top():
    g = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(5000, 64, generator=g), requires_grad=False)
    head = RescoredHead(weight)
    x = torch.randn(4, 64, generator=g)
    exact = x @ weight.t()
    logits = head(x)
    # the int8 logits' best RESCORED hold float32's best half of that, with room to spare
    top = exact.topk(cpu_weights.RESCORED // 2, dim=1).indices
    assert torch.equal(logits.argmax(1), exact.argmax(1))
    # float32 products, summed in another order than the GEMM's
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    assert _rel(logits, exact) < 2e-2  # the rest: int8 weights times int8 rows
