"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Point any OpenAI SDK at http://HOST:PORT/v1. A request runs through the same
AsyncEngineClient as the native routes; this package only translates OpenAI's request
fields into SamplingParams and the token stream back into OpenAI's response shapes.
vLLM's extra fields (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens, chat_template_kwargs, cache_salt) are accepted too, as
the SDK sends them through `extra_body`. Every error is {"error": {message, type, param, code}}
with the status that makes the SDK raise its matching exception class.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.plugins import hookimpl
from lightllm_plugin.server.engine_client import AsyncEngineClient
from lightllm_plugin.server.http_util import json_body_openapi, nullable

from .protocol import ROLES, ApiError, ChatRequest, CompletionRequest
from .serving import OpenAIServer
from .serving_chat import create_chat_completion
from .serving_completion import create_completion
from .serving_pooling import register_pooling_routes

TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
IMAGE_PART = {"type": "object", "required": ["type", "image_url"],
              "properties": {"type": {"const": "image_url"},
                             "image_url": {"type": "object", "required": ["url"],
                                           "properties": {"url": {"type": "string", "minLength": 1}}}}}
MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": list(ROLES)},
        # null only for an assistant message that carries tool_calls
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [TEXT_PART, IMAGE_PART]}}, {"type": "null"}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "tool_call_id": {"type": "string"},
    },
}


def request_body_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    """openapi_extra of /v1/completions and /v1/chat/completions: the bodies' structs, with
    the values the checks after decoding accept. Documentation only."""
    from lightllm_plugin.sampling_params import ACCEPTED
    from lightllm_plugin.server.engine_client import MAX_SAMPLES

    shared = {name: nullable(ACCEPTED[name]) for name in (
        "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "seed", "stop_token_ids", "stop", "cache_salt")}
    shared |= {
        "max_tokens": nullable(ACCEPTED["max_new_tokens"]),
        "min_tokens": nullable(ACCEPTED["min_new_tokens"]),
        "n": nullable({"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES}),
        "logit_bias": nullable({"type": "object", "maxProperties": 0, "description": "not supported"}),
    }
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
    prompt = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        token_ids,
        {"type": "array", "minItems": 1, "items": token_ids},
    ]}
    completion = json_body_openapi(CompletionRequest, documented={"CompletionRequest": {
        **shared, "prompt": prompt, "logprobs": nullable(ACCEPTED["logprobs"]),
        "suffix": nullable({"type": "string", "maxLength": 0, "description": "not supported"}),
    }})
    chat = json_body_openapi(ChatRequest, documented={"ChatRequest": {
        **shared,
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "max_completion_tokens": nullable(ACCEPTED["max_new_tokens"]),
        "top_logprobs": nullable(ACCEPTED["logprobs"]),
        "tool_choice": nullable({"enum": ["auto", "none"]}),
    }})
    return completion, chat


@hookimpl(tryfirst=True)
def register_routes(app: FastAPI, engine: AsyncEngineClient, config: EngineConfig) -> None:
    """The built-in plugin "openai": the /v1 routes (see lightllm_plugin.plugins)."""
    server = OpenAIServer(engine, config)
    router = APIRouter(prefix="/v1")
    completion_doc, chat_doc = request_body_docs()

    @router.get("/models")
    async def list_models():
        body = {"object": "list", "data": [server.model_card()]}
        return Response(msgspec.json.encode(body), media_type="application/json")

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != server.model_name:
            return ApiError(404, f"The model `{model_id}` does not exist", "model", "model_not_found").response()
        return Response(msgspec.json.encode(server.model_card()), media_type="application/json")

    @router.post("/completions", openapi_extra=completion_doc)
    async def completions(request: Request):
        return await create_completion(server, request)

    @router.post("/chat/completions", openapi_extra=chat_doc)
    async def chat_completions(request: Request):
        return await create_chat_completion(server, request)

    app.include_router(router)
    register_pooling_routes(app, server)
