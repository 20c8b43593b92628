"""SamplingParams: what a request asks of the sampler and the stop logic.

Pure python (no torch) so that the HTTP front end and the tokenizer process can build
and validate it; it crosses process boundaries as a msgspec struct.
"""

from __future__ import annotations

import msgspec

from lightllm_plugin.structured_outputs import StructuredOutputs

_INT32_MAX = 2**31 - 1  # counts and ids beyond this cannot cross a socket or reach a tensor


# the values validate() accepts, as JSON Schema: the HTTP routes document their fields with them
_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
ACCEPTED = {
    "temperature": {**_NUMBER, "minimum": 0},
    "top_p": {**_NUMBER, "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {**_INT, "minimum": -1, "maximum": _INT32_MAX},
    "min_p": {**_NUMBER, "minimum": 0, "maximum": 1},
    "repetition_penalty": {**_NUMBER, "exclusiveMinimum": 0},
    "presence_penalty": {**_NUMBER, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUMBER, "minimum": -2, "maximum": 2},
    "max_new_tokens": {**_INT, "minimum": 1, "maximum": _INT32_MAX},
    "min_new_tokens": {**_INT, "minimum": 0, "maximum": _INT32_MAX},
    # 64-bit signed; documented within +-2**53, which survives documents that hold numbers as floats
    "seed": {**_INT, "minimum": -(2**53), "maximum": 2**53},
    "logprobs": {**_INT, "minimum": 0, "maximum": 20},
    "stop_token_ids": {"type": "array", "items": {**_INT, "minimum": 0, "maximum": _INT32_MAX}},
    "cache_salt": {"type": "string", "minLength": 1, "maxLength": 1024},
    "stop": {"anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}}]},
}


class SamplingParams(msgspec.Struct, kw_only=True):
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    stop: list[str] = []  # stop strings, matched on text by the detokenizer
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token plus top-k
    skip_special_tokens: bool = True
    # requests share cached KV only with requests of the same salt: one salt per tenant keeps
    # tenants from learning each other's prompts through the prefix cache's timing
    cache_salt: str | None = None
    # vLLM's names for max_new_tokens / min_new_tokens, so vLLM code runs unchanged
    max_tokens: int | None = None
    min_tokens: int | None = None
    # the output is held to this constraint while sampling (a dict is read as StructuredOutputs)
    structured_outputs: StructuredOutputs | None = None
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled (LightLLM's, vLLM's)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None:
            self.max_new_tokens, self.max_tokens = self.max_tokens, None
        if self.min_tokens is not None:
            self.min_new_tokens, self.min_tokens = self.min_tokens, None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputs(**self.structured_outputs)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def for_sample(self, index: int) -> "SamplingParams":
        """The parameters of sample `index` of the n: n=1, and a seeded request's seed + index,
        wrapped into the signed 64-bit range the seed was checked against."""
        seed = None if self.seed is None else (self.seed + index + 2**63) % 2**64 - 2**63
        return msgspec.structs.replace(self, n=1, seed=seed)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= _INT32_MAX:
            raise ValueError(f"max_new_tokens must be an integer in [1, {_INT32_MAX}], got {self.max_new_tokens!r}")
        if self.top_k > _INT32_MAX:
            raise ValueError(f"top_k must be <= {_INT32_MAX}, got {self.top_k}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.cache_salt is not None and not (isinstance(self.cache_salt, str) and 1 <= len(self.cache_salt) <= 1024):
            raise ValueError("cache_salt must be a non-empty string of at most 1024 characters")
        if any(not isinstance(t, int) or not 0 <= t <= _INT32_MAX for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative 32-bit integers")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids or any(
                    not isinstance(t, int) or not 0 <= t <= _INT32_MAX for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
            if self.structured_outputs is not None:
                raise ValueError(f"allowed_token_ids and {self.structured_outputs.field}: "
                                 "a request takes one output constraint, got 2")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
