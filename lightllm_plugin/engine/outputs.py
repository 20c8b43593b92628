"""What one engine step reports for each request that produced a token."""

from __future__ import annotations

import msgspec


class TokenEvent(msgspec.Struct, array_like=True):
    req_id: int
    token_id: int
    logprob: float | None  # log-probability of token_id under the model (raw logits)
    top_logprobs: list[tuple[int, float]] | None  # top-k alternatives when asked for
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    output_len: int  # tokens generated so far, this one included
    prompt_len: int
    cached_len: int = 0  # prompt tokens whose KV came from the prefix cache instead of a prefill


class PoolingEvent(msgspec.Struct, array_like=True):
    """A pooling request (no sampler) whose prefill ended this step; its KV slots are free."""

    req_id: int
    data: list[float]  # the embedding, or the score head's logits (PoolerInfo says which)
    prompt_len: int
    cached_len: int = 0
