"""Token sampling on the device for a whole batch, one row per request.

Order: penalties -> min_new_tokens stop masking -> greedy argmax, or temperature ->
top_k -> top_p -> min_p -> exponential-race sampling. Logprobs are reported from
the raw model distribution (as vLLM does by default), not the processed one.
Seeded requests draw their noise from their own generator, so the same seed gives
the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightllm_plugin.sampling_params import SamplingParams


@dataclass
class SamplerRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    blocked_ids: list[int]  # stop/eos ids masked while min_new_tokens is not reached


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> None:
    vocab = logits.shape[1]
    device = logits.device
    for i, row in enumerate(rows):
        p = row.params
        if not _has_penalty(p):
            continue
        out_ids = torch.tensor([t for t in row.output_ids if t < vocab], dtype=torch.long, device=device)
        counts = torch.zeros(vocab, device=device).scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float))
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            prompt_ids = torch.tensor([t for t in row.prompt_ids if t < vocab], dtype=torch.long, device=device)
            seen[prompt_ids] = True
            l = logits[i]
            logits[i] = torch.where(seen, torch.where(l > 0, l / p.repetition_penalty, l * p.repetition_penalty), l)
        if p.frequency_penalty != 0.0:
            logits[i] -= p.frequency_penalty * counts
        if p.presence_penalty != 0.0:
            logits[i] -= p.presence_penalty * (counts > 0).float()


def _device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-step tensor: staged in pinned memory on CUDA so the copy does not block the host."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _to_host(*tensors: torch.Tensor) -> list[list]:
    """Every result of a step crosses to the host under one synchronization."""
    device = tensors[0].device
    if device.type != "cuda":
        return [t.tolist() for t in tensors]
    staged = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(device).synchronize()
    return [t.tolist() for t in staged]


def sample(logits: torch.Tensor, rows: list[SamplerRow], default_generator: torch.Generator) -> SampleResult:
    """logits: [B, V] float32, one row per entry of `rows`. The caller's buffer is not modified.

    The device work is queued without reading anything back; the token ids (and logprobs
    when asked for) come back to the host together at the end, the step's only sync.
    """
    device = logits.device
    want_logprobs = [r.params.logprobs for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_logprobs) else None

    if any(r.blocked_ids or _has_penalty(r.params) for r in rows):
        # CUDA-graph logits live in a static buffer: edit a copy
        logits = logits.clone()
        _apply_penalties(logits, rows)
        for i, row in enumerate(rows):
            if row.blocked_ids:
                logits[i, row.blocked_ids] = float("-inf")

    tokens = logits.argmax(dim=-1)
    greedy = [r.params.greedy for r in rows]
    if not all(greedy):
        greedy_mask = _device_tensor(greedy, torch.bool, device)
        tokens = torch.where(greedy_mask, tokens, _sample_random(logits, rows, default_generator))

    if raw_logprobs is None:
        (token_list,) = _to_host(tokens)
        return SampleResult(token_list, None, None)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    max_k = max(k or 0 for k in want_logprobs)
    tops: list[list[tuple[int, float]]] = [[] for _ in rows]
    if max_k == 0:
        token_list, chosen_list = _to_host(tokens, chosen)
        return SampleResult(token_list, chosen_list, tops)
    top_lp, top_ids = raw_logprobs.topk(max_k, dim=-1)
    token_list, chosen_list, top_lp, top_ids = _to_host(tokens, chosen, top_lp, top_ids)
    for i, k in enumerate(want_logprobs):
        if k:
            tops[i] = list(zip(top_ids[i][:k], top_lp[i][:k]))
    return SampleResult(token_list, chosen_list, tops)


def _sample_random(logits: torch.Tensor, rows: list[SamplerRow], default_generator: torch.Generator) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[1]
    settings = _device_tensor(
        [[r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows],
         [float(r.params.top_k if r.params.top_k > 0 else vocab) for r in rows],
         [r.params.top_p for r in rows],
         [r.params.min_p for r in rows]],
        torch.float32, device,
    )  # [4, B]
    temps, top_k, top_p, min_p = settings
    logits = logits / temps[:, None]

    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # drop a token once the mass before it already reaches top_p (the first token always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # back to token order so a seeded row's noise belongs to token ids, not to ranks
    probs = torch.zeros_like(probs).scatter_(1, sorted_idx, sorted_logits.softmax(dim=-1))

    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
    noise = torch.empty_like(probs).exponential_(generator=default_generator)
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    return (probs / noise).argmax(dim=-1)
