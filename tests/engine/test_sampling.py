"""The batch sampler against plain-torch formulas: filters, penalties, seeds, logprobs."""

import pytest
import torch

from lightllm_plugin.engine.sampling import SamplerRow, sample
from lightllm_plugin.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])


def _row(params, prompt=(), output=(), seed=None, blocked=()):
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return SamplerRow(params, list(prompt), list(output), gen, list(blocked))


def _empirical(params, draws=4000):
    rows = [_row(params)] * draws
    gen = torch.Generator().manual_seed(0)
    tokens = sample(LOGITS.repeat(draws, 1), rows, gen).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=LOGITS.numel()).float() / draws


def _expected(keep: list[int], temperature: float = 1.0):
    probs = torch.zeros_like(LOGITS)
    probs[keep] = torch.softmax(LOGITS[keep] / temperature, dim=0)
    return probs


@pytest.mark.parametrize(
    "params, keep",
    [
        (SamplingParams(temperature=1.0), [0, 1, 2, 3, 4, 5]),
        (SamplingParams(temperature=1.0, top_k=3), [0, 1, 2]),
        # softmax(LOGITS) = .39 .24 .14 .09 .05 .02: the mass before token 2 is .63 < .7, before token 3 .77
        (SamplingParams(temperature=1.0, top_p=0.7), [0, 1, 2]),
        # min_p 0.3 keeps tokens with p >= 0.3 * 0.39 = 0.117
        (SamplingParams(temperature=1.0, min_p=0.3), [0, 1, 2]),
    ],
)
def test_sampled_distribution_matches_filtered_softmax(params, keep):
    got = _empirical(params)
    want = _expected(keep)
    assert (got - want).abs().max() < 0.03, (got, want)
    assert got[[i for i in range(6) if i not in keep]].sum() == 0


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        got = _empirical(SamplingParams(temperature=t))
        assert (got - _expected(list(range(6)), t)).abs().max() < 0.03


def test_penalties_follow_their_formulas():
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    prompt, output = [0], [1, 1, 3]
    logits = torch.tensor([[2.0, 1.9, 0.9, -0.5, 0.0, -1.0]])
    # repetition: seen tokens (0 prompt; 1, 3 output) divided if > 0, multiplied if < 0
    expected = torch.tensor([1.0, 0.95, 0.9, -1.0, 0.0, -1.0])
    # frequency on output counts (1 twice, 3 once), presence on output tokens
    expected -= 0.25 * torch.tensor([0, 2, 0, 1, 0, 0]) + 0.5 * torch.tensor([0, 1, 0, 1, 0, 0])
    res = sample(logits.clone(), [_row(params, prompt, output)], torch.Generator())
    assert res.token_ids == [int(expected.argmax())] == [0]
    # unpenalized, token 1 would have lost to 0 anyway; stronger penalties hand the win to 2
    strong = SamplingParams(temperature=0, repetition_penalty=3.0, frequency_penalty=1.0)
    assert sample(logits.clone(), [_row(strong, prompt, output)], torch.Generator()).token_ids == [2]


def test_blocked_ids_never_chosen():
    res = sample(LOGITS[None].clone(), [_row(SamplingParams(temperature=0), blocked=[0, 1])], torch.Generator())
    assert res.token_ids == [2]


def test_seeded_rows_ignore_their_neighbours():
    p = SamplingParams(temperature=1.0)
    alone = sample(LOGITS[None].clone(), [_row(p, seed=5)], torch.Generator().manual_seed(1)).token_ids
    mixed = sample(
        LOGITS.repeat(3, 1), [_row(p), _row(p, seed=5), _row(p)], torch.Generator().manual_seed(99)
    ).token_ids
    assert mixed[1] == alone[0]


def test_logprobs_are_raw_log_softmax():
    p = SamplingParams(temperature=0.7, logprobs=2, seed=3, repetition_penalty=1.5)
    res = sample(LOGITS[None].clone(), [_row(p, output=[0])], torch.Generator())
    ref = torch.log_softmax(LOGITS, dim=0)
    assert res.logprobs[0] == pytest.approx(ref[res.token_ids[0]].item())
    assert res.top_logprobs[0] == [(0, pytest.approx(ref[0].item())), (1, pytest.approx(ref[1].item()))]
