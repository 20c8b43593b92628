"""Token sampling on the device for a whole batch, one row per request.

Order: penalties -> min_new_tokens stop masking -> the grammar's token mask -> greedy argmax, or temperature ->
top_k -> top_p -> min_p -> exponential-race sampling. Logprobs are reported from
the raw model distribution (as vLLM does by default), not the processed one.
Seeded requests draw their noise from their own generator, so the same seed gives
the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightllm_plugin.engine.structured_output import (
    BitmaskStager,
    MaskFill,
    allows_other_than,
    apply_token_bitmask,
    fill_bitmask,
    masked_logits,
    token_bits,
)
from lightllm_plugin.sampling_params import SamplingParams


@dataclass
class SamplerRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    blocked_ids: list[int]  # stop/eos ids masked while min_new_tokens is not reached
    # structured outputs: fills this row's token bitmask (engine/structured_output.py), or None
    grammar: object | None = None


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> None:
    vocab = logits.shape[1]
    device = logits.device
    for i, row in enumerate(rows):
        p = row.params
        if not has_penalty(p):
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


class PendingSample:
    """A step's sampled tokens (and logprobs) queued for the host but not yet waited for.

    `tokens` stays on the device, so the next decode step can take its input ids from it
    before the host has read this step's result."""

    def __init__(self, tokens: torch.Tensor, chosen: torch.Tensor | None, top: tuple[torch.Tensor, torch.Tensor] | None,
                 want_logprobs: list[int | None]):
        self.tokens = tokens
        self.want_logprobs = want_logprobs
        device = tokens.device
        parts = [tokens] + ([chosen] if chosen is not None else []) + (list(top) if top is not None else [])
        self._ready: torch.cuda.Event | None = None
        if device.type == "cuda":
            # copies into pinned host memory, then an event: waiting for this step leaves later
            # steps queued behind it running
            # into pinned memory explicitly: a copy to pageable memory would wait for the whole
            # stream, including the step queued behind this one
            self._staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parts]
            for host, dev in zip(self._staged, parts):
                host.copy_(dev, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(device))
        else:
            self._staged = parts
        self._has_chosen, self._has_top = chosen is not None, top is not None

    def result(self) -> SampleResult:
        if self._ready is not None:
            self._ready.synchronize()
        lists = [t.tolist() for t in self._staged]
        token_list = lists.pop(0)
        if not self._has_chosen:
            return SampleResult(token_list, None, None)
        chosen_list = lists.pop(0)
        tops: list[list[tuple[int, float]]] = [[] for _ in token_list]
        if self._has_top:
            top_lp, top_ids = lists
            for i, k in enumerate(self.want_logprobs):
                if k:
                    tops[i] = list(zip(top_ids[i][:k], top_lp[i][:k]))
        return SampleResult(token_list, chosen_list, tops)


class DeferredSample:
    """A step's logits whose sampling waits for the host: a grammar's mask for this step needs the
    token the step before sampled, which a step queued ahead of the host does not know yet."""

    def __init__(self, logits: torch.Tensor, rows: list[SamplerRow], default_generator: torch.Generator,
                 bitmasks: BitmaskStager | None = None):
        self.logits, self.rows, self.default_generator, self.bitmasks = logits, rows, default_generator, bitmasks

    def start_masks(self) -> MaskFill | None:
        """Begin filling this step's masks (the grammars have taken the tokens before); the caller
        does other work, then launches with the result."""
        return self.bitmasks.start([r.grammar for r in self.rows]) if self.bitmasks is not None else None

    @torch.inference_mode()
    def launch(self, masks: MaskFill | None = None) -> PendingSample:
        return launch_sample(self.logits, self.rows, self.default_generator, self.bitmasks, masks)


def sample(logits: torch.Tensor, rows: list[SamplerRow], default_generator: torch.Generator) -> SampleResult:
    """Sample and wait for the result."""
    return launch_sample(logits, rows, default_generator).result()


def launch_sample(logits: torch.Tensor, rows: list[SamplerRow], default_generator: torch.Generator,
                  bitmasks: BitmaskStager | None = None, started: MaskFill | None = None) -> PendingSample:
    """logits: [B, V] float32, one row per entry of `rows`. The caller's buffer is not modified.
    `bitmasks`: the caller's buffers for the grammars' token masks, kept from step to step;
    `started`: this step's masks, already being filled there.

    The device work is queued without reading anything back; `PendingSample.result()` brings
    the token ids (and logprobs when asked for) to the host under one wait, the step's only sync.
    """
    device = logits.device
    want_logprobs = [r.params.logprobs for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_logprobs) else None

    # filled on the host: each grammar has taken the row's previous token
    masks = None
    if started is not None:
        masks = started.wait()
    elif bitmasks is not None:
        masks = bitmasks.fill([r.grammar for r in rows])
    else:
        host = fill_bitmask([r.grammar for r in rows], logits.shape[1])
        masks = (host, host.to(device)) if host is not None else None
    bitmask = masks[0] if masks is not None else None
    bits = bitmasks.bits if bitmasks is not None else None
    edits = any(r.blocked_ids or has_penalty(r.params) for r in rows)
    if bitmask is not None and not edits:
        logits = masked_logits(logits, masks[1], bits if bits is not None else token_bits(device))
    elif bitmask is not None or edits:
        # CUDA-graph logits live in a static buffer: edit a copy
        logits = logits.clone()
        _apply_penalties(logits, rows)
        for i, row in enumerate(rows):
            if not row.blocked_ids:
                continue
            if bitmask is not None and row.grammar is not None and not allows_other_than(bitmask[i], row.blocked_ids):
                # the grammar is complete and only a stop token may follow: the output cannot grow
                # legally, so min_new_tokens gives way (masking the stop too would leave no token)
                continue
            logits[i, row.blocked_ids] = float("-inf")
        if bitmask is not None:
            apply_token_bitmask(logits, masks[1], bits)

    tokens = logits.argmax(dim=-1)
    greedy = [r.params.greedy for r in rows]
    if not all(greedy):
        greedy_mask = _device_tensor(greedy, torch.bool, device)
        tokens = torch.where(greedy_mask, tokens, _sample_random(logits, rows, default_generator))

    if raw_logprobs is None:
        return PendingSample(tokens, None, None, want_logprobs)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    max_k = max(k or 0 for k in want_logprobs)
    top = None
    if max_k > 0:
        top_lp, top_ids = raw_logprobs.topk(max_k, dim=-1)
        top = (top_lp, top_ids)
    return PendingSample(tokens, chosen, top, want_logprobs)


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
