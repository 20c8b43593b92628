"""HTTP pieces shared by the native routes and the adapters' routes."""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, TypeVar

import anyio
import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

T = TypeVar("T")


class BadRequest(Exception):
    """Refuse a request; `message` names the offending field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_json_body(request: Request, schema: type[T]) -> T:
    """Decode the body strictly against schema: a string where a number belongs is an
    error naming the field, not a silent coercion. Unknown keys are ignored."""
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.parameters.max_new_tokens`"
        raise BadRequest(422, _name_the_field(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(400, f"the body is not valid JSON: {exc}") from None


_MISSING = re.compile(r"^Object missing required field `(\w+)`")


def _name_the_field(message: str) -> str:
    what, sep, where = message.rpartition(" - at `$.")
    missing = _MISSING.match(what if sep else message)
    if missing:  # "model: ..." names the missing field itself
        field = (where.rstrip("`") + "." if sep else "") + missing.group(1)
        return f"{field}: {missing.group(0)}"
    if not sep:
        return message
    return f"{where.rstrip('`')}: {what}"


class DisconnectAbortingStream(StreamingResponse):
    """A streaming response that notices a client disconnect even while no token is being
    sent, and always closes its iterator, so the request is aborted and its KV slots freed."""

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the server's send after the client left
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class RequireApiKey:
    """ASGI middleware: every HTTP route but the open ones needs `Authorization: Bearer KEY`.
    The key is compared in constant time; a refusal is a 401 in OpenAI's error shape, which
    the OpenAI SDK turns into AuthenticationError."""

    def __init__(self, app, api_key: str, open_paths: frozenset[str]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps(
            {
                "error": {
                    "message": "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body})
