"""OpenAI's request bodies, its error object, and a request's sampling fields as SamplingParams."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from fastapi.responses import Response

from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.http_util import openai_error
from lightllm_plugin.server.protocol import TokenOutput
from lightllm_plugin.structured_outputs import StructuredOutputs

ROLES = ("system", "developer", "user", "assistant", "tool")


# ---- errors ------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return openai_error(self.status, self.message, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return Response(
            msgspec.json.encode(self.body()), status_code=self.status, media_type="application/json", headers=headers
        )


_LEADING_NAME = re.compile(r"^`?([A-Za-z_][\w.\[\]]*)")


def invalid(message: str, status: int = 400, renames: dict[str, str] | None = None) -> ApiError:
    """An error from a message that starts with the field it concerns ("temperature must be
    >= 0"); the engine's field names are put back into the names this client used. `param`
    is that field when it is one of the request's fields, else null (a message such as "the
    body is not valid JSON" or "Expected `object`, got `array`" names no field)."""
    for ours, theirs in (renames or {}).items():
        message = re.sub(rf"\b{ours}\b", theirs, message)
    match = _LEADING_NAME.match(message) if status < 500 else None
    param = re.sub(r"\[\d+\]", "", match.group(1)) if match else None
    if param is not None and re.split(r"[.\[]", param, maxsplit=1)[0] not in _request_fields():
        param = None
    return ApiError(status, message, param)


# ---- requests ----------------------------------------------------------------------------
class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = False


class _Request(msgspec.Struct, kw_only=True):
    """Fields both endpoints take. Unknown fields are ignored, null means the default."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    cache_salt: str | None = None  # requests with different salts never share prefix-cache KV
    # output constraints (adapters/openai/structured.py): OpenAI's, then vLLM's
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # vLLM's; one backend here (xgrammar): ignored
    allowed_token_ids: list[int] | None = None


class CompletionRequest(_Request, kw_only=True):
    prompt: Any  # a string, strings, token ids or lists of token ids: checked by completion_prompts
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Request, kw_only=True):
    messages: list[Any]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def _request_fields() -> frozenset[str]:
    return frozenset(CompletionRequest.__struct_fields__) | frozenset(ChatRequest.__struct_fields__)


def value_or(value, default):
    return default if value is None else value


def sampling_params(req: _Request, *, max_tokens: int, logprobs: int | None, renames: dict[str, str],
                    constraint: StructuredOutputs | None = None) -> SamplingParams:
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    try:
        return SamplingParams(
            n=value_or(req.n, 1),
            temperature=value_or(req.temperature, 1.0),
            top_p=value_or(req.top_p, 1.0),
            top_k=value_or(req.top_k, -1),
            min_p=value_or(req.min_p, 0.0),
            repetition_penalty=value_or(req.repetition_penalty, 1.0),
            presence_penalty=value_or(req.presence_penalty, 0.0),
            frequency_penalty=value_or(req.frequency_penalty, 0.0),
            max_new_tokens=max_tokens,
            min_new_tokens=value_or(req.min_tokens, 0),
            ignore_eos=value_or(req.ignore_eos, False),
            stop_token_ids=list(req.stop_token_ids or []),
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            seed=req.seed,
            # the detokenizer renders token strings only when top alternatives are asked for,
            # so ask for at least one and show the client the number it asked for
            logprobs=None if logprobs is None else max(1, logprobs),
            skip_special_tokens=value_or(req.skip_special_tokens, True),
            cache_salt=req.cache_salt,
            structured_outputs=constraint,
            allowed_token_ids=req.allowed_token_ids,
        )
    except ValueError as exc:
        raise invalid(str(exc), renames=renames) from None


# ---- responses ---------------------------------------------------------------------------
def token_strings(out: TokenOutput) -> list[str]:
    return out.logprob_tokens or [""] * (1 + len(out.top_logprobs or []))
