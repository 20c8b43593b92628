"""What every /v1 route shares: the engine client, the served model's name and card, the
head of each response, and reading a request body."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.server.engine_client import AsyncEngineClient
from lightllm_plugin.server.http_util import BadRequest, read_json_body

from .protocol import ApiError, invalid

OWNER = "lightllm-plugin"


class OpenAIServer:
    def __init__(self, client: AsyncEngineClient, config: EngineConfig):
        from lightllm_plugin import __version__

        self.client = client
        self.config = config
        self.model_name = config.model_name()
        self.created = int(time.time())
        digest = hashlib.sha256(f"{__version__}|{config.resolved_model_path}|{config.resolved_dtype}".encode())
        self.fingerprint = f"fp_{digest.hexdigest()[:10]}"

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "root": self.config.resolved_model_path or self.model_name,
            "parent": None,
            "max_model_len": self.config.max_req_total_len,
        }

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(
                404, f"The model `{model}` does not exist; this server serves `{self.model_name}`", "model",
                "model_not_found",
            )

    async def read(self, request: Request, schema):
        try:
            return await read_json_body(request, schema)
        except BadRequest as exc:
            raise invalid(exc.message, exc.status) from None

    def head(self, prefix: str, obj: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
        }

    def refused(self, exc: ApiError) -> Response:
        self.client.metrics.requests_rejected.inc(status=str(exc.status))
        return exc.response()
