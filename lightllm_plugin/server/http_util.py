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


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


OPENAI_PREFIX = "/v1/"


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; its type follows the status, as the OpenAI SDK expects."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def shaped_error_body(path: str, status: int, message: str, code: str | None = None) -> bytes:
    """An error in the shape of the route it answers, for code that runs before any route
    (middleware, exception handlers): OpenAI's nested object under /v1/, else LightLLM's flat one."""
    if path.startswith(OPENAI_PREFIX):
        return json.dumps(openai_error(status, message, code=code)).encode()
    return json.dumps({"error": message}).encode()


async def send_json(send, status: int, body: bytes, headers=()) -> None:
    """A whole JSON response from ASGI middleware, which runs before FastAPI's responses exist."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send, path: str, status: int, message: str, code: str | None = None, headers=()) -> None:
    await send_json(send, status, shaped_error_body(path, status, message, code), headers)


DRAIN_FACTOR = 4


class LimitBodySize:
    """ASGI middleware: a request body over max_bytes is refused with 413 before any route
    reads it. The body is read here (every route reads it whole anyway) and handed on."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than max_body_size={self.max_bytes} bytes"
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        # a body a little over the limit is read and dropped, so the client sees the 413 rather
        # than a connection reset while it is still sending; a far larger one is cut off at once
        if declared is not None and declared.isdigit() and int(declared) > DRAIN_FACTOR * self.max_bytes:
            return await send_error(send, scope["path"], 413, too_big, headers=[(b"connection", b"close")])
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                chunks = []
                if not more or size > DRAIN_FACTOR * self.max_bytes:
                    return await send_error(send, scope["path"], 413, too_big, headers=[(b"connection", b"close")])
                continue
            chunks.append(chunk)
            if not more:
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect the streaming routes watch for

        await self.app(scope, replay, send)


async def read_json_body(request: Request, schema: type[T]) -> T:
    """Decode the body strictly against schema: a string where a number belongs is an
    error naming the field, not a silent coercion. Unknown keys are ignored."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise BadRequest(415, f"the body must be JSON: send Content-Type: application/json, not {kind}")
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.parameters.max_new_tokens`"
        raise BadRequest(422, _name_the_field(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(400, f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise BadRequest(400, "the body is not valid JSON: it is not valid UTF-8") from None


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """A documented field that may also be null (null means the default)."""
    return {"anyOf": [schema, {"type": "null"}]}


def json_body_openapi(
    schema: type,
    description: str | None = None,
    documented: dict[str, dict[str, Any]] | None = None,
    constraints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body itself with read_json_body: the
    body's schema, generated from the same msgspec struct the body is decoded with, goes into
    the OpenAPI document (for clients, docs and schema-driven fuzzing). Documentation only:
    the route's behaviour does not change. `documented` narrows fields to the values the
    route accepts ({struct name: {field: schema}}), e.g. a range its checks enforce after
    decoding; other values still get their 4xx. `constraints` joins the body's own schema
    (e.g. which fields go together). References are inlined (no recursive structs)."""
    root = msgspec.json.schema(schema)
    defs = root.pop("$defs", {})
    for struct, fields in (documented or {}).items():
        properties = defs[struct]["properties"]
        for name, field_schema in fields.items():
            if name not in properties:
                raise KeyError(f"{struct} has no field {name}")
            default = properties[name].get("default", msgspec.UNSET)
            properties[name] = dict(field_schema)
            if default is not msgspec.UNSET:
                properties[name]["default"] = default

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**defs[ref.rsplit("/", 1)[1]], **rest})
            out = {k: inline(v) for k, v in node.items()}
            if out.get("required") == []:
                del out["required"]
            return out
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    body_schema = inline(root)
    body_schema.update(constraints or {})
    body: dict[str, Any] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


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
        message = "Incorrect or missing API key: send `Authorization: Bearer <key>`"
        body = json.dumps(openai_error(401, message, code="invalid_api_key")).encode()
        await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
