"""LightLLM's reward-model route: POST /get_score.

Request: {"chat": text, "parameters": {...}} (LightLLM sends the conversation already rendered
as text; `parameters` is accepted and unused: a score has nothing to sample). Answer:
{"score": float, "prompt_tokens": int, "finish_reason": "stop"}: the score head's one logit, as
a reward model gives it (no sigmoid).
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lightllm_plugin.server.engine_client import AsyncEngineClient, RequestRejected
from lightllm_plugin.server.http_util import BadRequest, error_response, read_json_body


class ScoreRequest(msgspec.Struct, kw_only=True):
    chat: str | None = None
    parameters: dict[str, Any] | None = None


def pooling_routes(client: AsyncEngineClient) -> APIRouter:
    router = APIRouter()

    @router.post("/get_score")
    async def get_score(request: Request):
        try:
            body = await read_json_body(request, ScoreRequest)
            if not body.chat:
                raise BadRequest(400, "chat is required and must not be empty")
            pooler = client.pooler
            if pooler is not None and (pooler.head != "classify" or pooler.dimensions != 1):
                raise BadRequest(400, f"/get_score needs a reward model (a score head of one label); this server "
                                      f"serves {pooler.described()}, its routes: {pooler.routes()}")
        except BadRequest as exc:
            client.metrics.requests_rejected.inc(status=str(exc.status))
            return error_response(exc.status, exc.message)
        try:
            event = await client.pool(prompt=body.chat, field="chat")
        except RequestRejected as exc:
            return error_response(exc.status, exc.message, exc.headers)
        return JSONResponse({"score": event.data[0], "prompt_tokens": event.prompt_len, "finish_reason": "stop"})

    return router
