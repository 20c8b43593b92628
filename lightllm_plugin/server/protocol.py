"""The messages that cross process boundaries, one tagged union per receiving socket.

Every socket carries msgspec structs encoded with msgpack and decoded against the union
that socket accepts, so a peer can only ever make the receiver build these plain structs:
nothing on any socket is unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

import msgspec

from lightllm_plugin.engine.outputs import PoolingEvent, TokenEvent
from lightllm_plugin.images import ImageData
from lightllm_plugin.pooling_params import PoolerInfo
from lightllm_plugin.sampling_params import SamplingParams


# ---- api -> tokenizer -------------------------------------------------------------------
class TokenizeRequest(msgspec.Struct, tag=True, kw_only=True):
    """One client request; exactly one of prompt, prompt_ids, messages is set."""

    req_ids: list[int]  # one id per sample, len == params.n
    params: SamplingParams
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True
    field: str = "inputs"  # how the client named the prompt, so errors can name it too
    # LightLLM lowers max_new_tokens to the room left; OpenAI clients expect a refusal (vLLM's 400)
    lower_max_new_tokens: bool = True
    text_pair: str | None = None  # a cross-encoder's second text, encoded with prompt as a pair
    # images beside the prompt (LightLLM's multimodal_params): data URLs, base64, http(s) URLs, in
    # the order of the prompt's placeholders, after any image parts of `messages`
    images: list[str] | None = None


# ---- tokenizer / api / detokenizer -> router -------------------------------------------
class AddRequest(msgspec.Struct, tag=True):
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams  # n == 1
    images: list[ImageData] | None = None  # preprocessed, on their placeholder tokens in prompt_ids


class AbortRequest(msgspec.Struct, tag=True):
    """The client went away: free the request's slots, emit nothing more."""

    req_ids: list[int]


class FinishRequest(msgspec.Struct, tag=True):
    """The detokenizer matched a stop string: the request is complete, stop computing it."""

    req_id: int


class FlushCache(msgspec.Struct, tag=True):
    """Drop every prefix-cache entry no live request uses; answered by CacheFlushed with this id."""

    id: int


RouterInbox = Union[AddRequest, AbortRequest, FinishRequest, FlushCache]


# ---- router -> detokenizer --------------------------------------------------------------
class DetokenizeStart(msgspec.Struct, tag=True):
    """Sent before the request's first token so the detokenizer knows how to render it."""

    req_id: int
    prompt_tail: list[int]  # last prompt tokens: context so the first word keeps its leading space
    stop: list[str]
    skip_special_tokens: bool


class TokenBatch(msgspec.Struct, tag=True):
    events: list[TokenEvent]


class DetokenizeForget(msgspec.Struct, tag=True):
    """Aborted requests: drop their state, no output follows."""

    req_ids: list[int]


DetokenizerInbox = Union[DetokenizeStart, TokenBatch, DetokenizeForget]


# ---- detokenizer / router / tokenizer -> api --------------------------------------------
class TokenOutput(msgspec.Struct, array_like=True):
    req_id: int
    token_id: int
    text: str  # text this token releases; "" while bytes of a character or a possible stop string are held back
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    special: bool
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    output_len: int
    prompt_len: int
    # the strings of the chosen token and of each top_logprobs id, in that order; rendered
    # only when top alternatives were asked for (logprobs >= 1), so plain requests pay nothing
    logprob_tokens: list[str] | None = None
    cached_len: int = 0  # prompt tokens read from the prefix cache instead of computed


class OutputBatch(msgspec.Struct, tag=True):
    outputs: list[TokenOutput]


class RequestError(msgspec.Struct, tag=True):
    """The request was refused (bad input); nothing of it is running."""

    req_ids: list[int]
    message: str
    status: int = 400


class EngineStats(msgspec.Struct, tag=True):
    num_running: int
    num_waiting: int
    used_slots: int  # slots no new request can have: cache entries nothing uses count as free
    total_slots: int
    # prefix cache: cumulative prompt tokens of admitted requests and, of those, the ones read
    # from the cache (the api turns their growth into counters); slots the cache owns now
    cache_query_tokens: int = 0
    cache_hit_tokens: int = 0
    cached_slots: int = 0


class CacheFlushed(msgspec.Struct, tag=True):
    """The answer to FlushCache `id`: how many KV slots the flush returned to the free-list."""

    id: int
    freed_slots: int


class PoolingBatch(msgspec.Struct, tag=True):
    """Pooling requests that ended in one step (router -> api: no text to render)."""

    outputs: list[PoolingEvent]


ApiInbox = Union[OutputBatch, RequestError, EngineStats, CacheFlushed, PoolingBatch]


# ---- children -> launcher ---------------------------------------------------------------
class Ready(msgspec.Struct, tag=True, kw_only=True):
    role: str
    pid: int
    # filled by the router, which is the one process that loads the model
    total_slots: int = 0
    eos_ids: list[int] = []
    model_path: str = ""
    dtype: str = ""
    device: str = ""
    # the limits in force: the engine lowers them to the model's context length
    max_req_total_len: int = 0
    max_req_input_len: int = 0
    task: str = "generate"  # what the model does (--task, resolved)
    pooler: PoolerInfo | None = None  # a pooling model's vectors; None: it generates


ControlInbox = Ready


# ---- launcher -> tokenizer (over a private pipe, once) ----------------------------------
class Limits(msgspec.Struct):
    """The length limits in force, known only once the router has loaded the model."""

    max_req_total_len: int
    max_req_input_len: int


# ---- addresses ----------------------------------------------------------------------------
class _Endpoint:
    """An ipc:// address in the run directory; the socket file is named after the attribute."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, addresses: "Addresses | None", owner: type | None = None) -> Any:
        if addresses is None:
            return self
        return "ipc://" + os.path.join(addresses.run_dir, self.name)


@dataclass(frozen=True)
class Addresses:
    """ipc:// endpoints, all inside one private run directory (one per receiving socket)."""

    run_dir: str

    tokenizer = _Endpoint()
    router = _Endpoint()
    detokenizer = _Endpoint()
    api = _Endpoint()
    control = _Endpoint()


encoder = msgspec.msgpack.Encoder()


def decoder_for(inbox: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(inbox)
