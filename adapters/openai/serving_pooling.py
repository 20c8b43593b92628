"""The routes of pooling models, each in its ecosystem's shape.

- OpenAI's `POST /v1/embeddings`: `input` a string, strings, token ids or lists of token ids;
  `encoding_format` float or base64 (little-endian float32, what the OpenAI SDK decodes);
  `dimensions` only where the model's config declares Matryoshka dimensions; `usage`.
- vLLM's `POST /pooling` (the engine's vectors as they are), `POST /classify` (class
  probabilities), `POST /score` (`text_1` against `text_2`: one against many, or pair by pair)
  and `POST /v1/rerank` (also `/rerank`, `/v2/rerank`: Jina's and Cohere's shape, `query`,
  `documents`, `top_n`, results sorted by `relevance_score`).

An embedding model scores by the cosine of two embeddings, a score head of one label by the
sigmoid of its logit for the two texts encoded as a pair (a cross-encoder). Every input of a
request becomes one engine request, all sent at once so the engine batches them. Errors under
/v1 are OpenAI's {"error": {...}} object naming the field (`param`), elsewhere the server's
{"error": message}, as on every other route.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from lightllm_plugin.engine.outputs import PoolingEvent
from lightllm_plugin.pooling_params import (
    PoolerInfo,
    check_dimensions,
    class_probs,
    cosine,
    sigmoid,
    truncate_embedding,
)
from lightllm_plugin.server.engine_client import RequestRejected
from lightllm_plugin.server.http_util import error_response, json_body_openapi, nullable

from .protocol import ApiError
from .serving import OpenAIServer

ENCODING_FORMATS = ("float", "base64")


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str | None = None  # required by OpenAI's API; vLLM's /pooling lets it out
    input: Any = None
    encoding_format: str | None = "float"
    dimensions: int | None = None
    user: str | None = None
    add_special_tokens: bool | None = True


class ScoreRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    text_1: Any = None
    text_2: Any = None


class RerankRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    query: Any = None
    documents: Any = None
    top_n: int | None = None
    return_documents: bool | None = True


def _texts_or_ids(value: Any, field: str, limit: int) -> list[dict[str, Any]]:
    """One pool() input per item of `value`: a string, strings, token ids or lists of token ids."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(type(t) is int for t in value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise ApiError(400, f"{field} must be a string, a list of strings, a list of token ids or a list of "
                            f"token-id lists", field)
    if not items:
        raise ApiError(400, f"{field} must not be an empty list", field)
    if len(items) > limit:
        raise ApiError(400, f"{field} has {len(items)} items, more than max_batch_embeddings={limit}", field)
    inputs = []
    for i, item in enumerate(items):
        where = field if len(items) == 1 and not isinstance(value, list) else f"{field}[{i}]"
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"{where} must not be an empty string", field)
            inputs.append({"prompt": item, "field": where})
        elif isinstance(item, list) and item and all(type(t) is int for t in item):
            inputs.append({"prompt_ids": item, "field": where})
        else:
            raise ApiError(400, f"{where} must be a non-empty string or a non-empty list of token ids", field)
    return inputs


def _texts(value: Any, field: str, limit: int) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise ApiError(400, f"{field} must be a string or a list of strings", field)
    if not items:
        raise ApiError(400, f"{field} must not be an empty list", field)
    if len(items) > limit:
        raise ApiError(400, f"{field} has {len(items)} items, more than max_batch_embeddings={limit}", field)
    for i, text in enumerate(items):
        if not text:
            raise ApiError(400, f"{field}[{i}] must not be an empty string" if isinstance(value, list)
                           else f"{field} must not be an empty string", field)
    return items


class PoolingRoutes:
    def __init__(self, server: OpenAIServer):
        self.server = server
        self.client = server.client
        self.limit = server.config.max_batch_embeddings

    @property
    def pooler(self) -> PoolerInfo | None:
        return self.client.pooler

    def _check_model(self, model: str | None, required: bool = False) -> None:
        if model is None and required:
            raise ApiError(400, "model is required", "model")
        if model is not None:
            self.server.check_model(model)

    def _need(self, head: str | None, route: str) -> PoolerInfo:
        """The served model's pooler, or the 400 saying what the served model does."""
        pooler = self.pooler
        if pooler is None:
            # the engine client words the refusal (the served model generates, its routes)
            return None
        if head is not None and pooler.head != head:
            what = "an embedding model" if head == "embed" else "a model with a score head"
            raise ApiError(400, f"{route} needs {what}; this server serves {pooler.described()}, "
                                f"its routes: {pooler.routes()}", None)
        return pooler

    async def _pool(self, inputs: list[dict[str, Any]]) -> list[PoolingEvent]:
        try:
            return await self.client.pool_many(inputs)
        except RequestRejected as exc:
            field = exc.message.split(" ", 1)[0].split("[", 1)[0]
            param = field if field in ("input", "text_1", "text_2", "query", "documents") else None
            raise ApiError(exc.status, exc.message, param) from None

    def _head(self, obj: str) -> dict[str, Any]:
        head = self.server.head("embd" if obj == "list" else obj, "list")
        head.pop("system_fingerprint", None)
        return head

    @staticmethod
    def _usage(events: list[PoolingEvent]) -> dict[str, int]:
        tokens = sum(e.prompt_len for e in events)
        return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}

    @staticmethod
    def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        return vector

    async def _read(self, request: Request, schema):
        return await self.server.read(request, schema)

    def _encoding(self, body: EmbeddingRequest) -> str:
        fmt = body.encoding_format or "float"
        if fmt not in ENCODING_FORMATS:
            raise ApiError(400, f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
        return fmt

    # ---- the routes ----------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        body = await self._read(request, EmbeddingRequest)
        self._check_model(body.model, required=True)
        fmt = self._encoding(body)
        inputs = _texts_or_ids(body.input, "input", self.limit)
        pooler = self._need("embed", "/v1/embeddings")
        if pooler is not None:
            try:
                check_dimensions(pooler, body.dimensions)
            except ValueError as exc:
                raise ApiError(400, str(exc), "dimensions") from None
        for kw in inputs:
            kw["add_special_tokens"] = body.add_special_tokens is not False
        events = await self._pool(inputs)
        data = [{"object": "embedding", "index": i,
                 "embedding": self._encode(truncate_embedding(pooler, e.data, body.dimensions), fmt)}
                for i, e in enumerate(events)]
        return _json({"object": "list", "data": data, "model": self.server.model_name, "usage": self._usage(events)})

    async def pooling(self, request: Request) -> Response:
        body = await self._read(request, EmbeddingRequest)
        self._check_model(body.model)
        fmt = self._encoding(body)
        inputs = _texts_or_ids(body.input, "input", self.limit)
        if body.dimensions is not None:
            raise ApiError(400, "dimensions is taken by /v1/embeddings only", "dimensions")
        self._need(None, "/pooling")
        events = await self._pool(inputs)
        data = [{"index": i, "object": "pooling", "data": self._encode(e.data, fmt)} for i, e in enumerate(events)]
        return _json({**self._head("pool"), "data": data, "usage": self._usage(events)})

    async def classify(self, request: Request) -> Response:
        body = await self._read(request, EmbeddingRequest)
        self._check_model(body.model)
        inputs = _texts_or_ids(body.input, "input", self.limit)
        pooler = self._need("classify", "/classify")
        events = await self._pool(inputs)
        data = []
        for i, e in enumerate(events):
            probs = class_probs(e.data)
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": pooler.labels[best] if pooler.labels else str(best),
                         "probs": probs, "num_classes": len(probs)})
        return _json({**self._head("classify"), "data": data, "usage": self._usage(events)})

    async def _scores(self, firsts: list[str], seconds: list[str], first_field: str, second_field: str):
        """(score of each pair, the engine events) for firsts[i] against seconds[i]."""
        pooler = self._need(None, "/score")
        if pooler is not None and pooler.head == "classify":
            if pooler.dimensions != 1:
                raise ApiError(400, f"scoring needs a score head of one label; this model has {pooler.dimensions} "
                                    f"(use /classify)", None)
            events = await self._pool([{"prompt": a, "text_pair": b, "field": f"{second_field}[{i}]"}
                                       for i, (a, b) in enumerate(zip(firsts, seconds))])
            return [sigmoid(e.data[0]) for e in events], events
        # an embedding model: each distinct text once
        distinct = list(dict.fromkeys(firsts + seconds))
        fields = {t: first_field for t in firsts} | {t: second_field for t in seconds}
        events = await self._pool([{"prompt": t, "field": fields[t]} for t in distinct])
        vectors = {t: e.data for t, e in zip(distinct, events)}
        return [cosine(vectors[a], vectors[b]) for a, b in zip(firsts, seconds)], events

    async def score(self, request: Request) -> Response:
        body = await self._read(request, ScoreRequest)
        self._check_model(body.model)
        firsts = _texts(body.text_1, "text_1", self.limit)
        seconds = _texts(body.text_2, "text_2", self.limit)
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        if len(firsts) != len(seconds):
            raise ApiError(400, f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: give one text_1, "
                                f"or as many as text_2", "text_1")
        scores, events = await self._scores(firsts, seconds, "text_1", "text_2")
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return _json({**self._head("score"), "data": data, "usage": self._usage(events)})

    async def rerank(self, request: Request) -> Response:
        body = await self._read(request, RerankRequest)
        self._check_model(body.model)
        if not isinstance(body.query, str) or not body.query:
            raise ApiError(400, "query must be a non-empty string", "query")
        documents = _texts(body.documents, "documents", self.limit)
        if body.top_n is not None and body.top_n < 1:
            raise ApiError(400, f"top_n must be >= 1, got {body.top_n}", "top_n")
        scores, events = await self._scores([body.query] * len(documents), documents, "query", "documents")
        order = sorted(range(len(documents)), key=lambda i: -scores[i])[: body.top_n or len(documents)]
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scores[i]}
            if body.return_documents is not False:
                result["document"] = {"text": documents[i]}
            results.append(result)
        usage = self._usage(events)
        return _json({"id": self._head("rerank")["id"], "model": self.server.model_name,
                      "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["total_tokens"]},
                      "results": results})


def _json(body: dict[str, Any]) -> Response:
    return Response(msgspec.json.encode(body), media_type="application/json")


def request_body_docs() -> dict[str, dict[str, Any]]:
    """openapi_extra of each route: the body's struct, with the values the checks accept."""
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
    text = {"type": "string", "minLength": 1}
    texts = {"anyOf": [text, {"type": "array", "minItems": 1, "items": text}]}
    inputs = {"anyOf": [text, {"type": "array", "minItems": 1, "items": text}, ids,
                        {"type": "array", "minItems": 1, "items": ids}]}
    embedding = {"input": inputs, "encoding_format": nullable({"enum": list(ENCODING_FORMATS)}),
                 "dimensions": nullable({"type": "integer", "minimum": 1})}
    required = {"required": ["input"]}
    return {
        "embeddings": json_body_openapi(EmbeddingRequest, "OpenAI's embeddings request",
                                        documented={"EmbeddingRequest": embedding},
                                        constraints={"required": ["model", "input"]}),
        "pooling": json_body_openapi(EmbeddingRequest, "vLLM's pooling request", documented={"EmbeddingRequest": {
            **embedding, "dimensions": {"type": "null"}}}, constraints=required),
        "classify": json_body_openapi(EmbeddingRequest, "vLLM's classify request",
                                      documented={"EmbeddingRequest": embedding}, constraints=required),
        "score": json_body_openapi(ScoreRequest, "vLLM's score request: text_1 against text_2",
                                   documented={"ScoreRequest": {"text_1": texts, "text_2": texts}},
                                   constraints={"required": ["text_1", "text_2"]}),
        "rerank": json_body_openapi(RerankRequest, "Jina's and Cohere's rerank request", documented={"RerankRequest": {
            "query": text, "documents": {"type": "array", "minItems": 1, "items": text},
            "top_n": nullable({"type": "integer", "minimum": 1})}}, constraints={"required": ["query", "documents"]}),
    }


def register_pooling_routes(app: FastAPI, server: OpenAIServer) -> None:
    routes = PoolingRoutes(server)
    router = APIRouter()
    docs = request_body_docs()

    def route(path: str, handler, doc: str, documented: bool = True):
        async def endpoint(request: Request):
            try:
                return await handler(request)
            except ApiError as exc:
                if path.startswith("/v1/"):
                    return server.refused(exc)
                # outside /v1 the server's own shape: {"error": message}
                server.client.metrics.requests_rejected.inc(status=str(exc.status))
                return error_response(exc.status, exc.message)

        endpoint.__name__ = "pooling_" + path.strip("/").replace("/", "_")
        router.add_api_route(path, endpoint, methods=["POST"], openapi_extra=docs[doc], include_in_schema=documented)

    route("/v1/embeddings", routes.embeddings, "embeddings")
    route("/pooling", routes.pooling, "pooling")
    route("/classify", routes.classify, "classify")
    # vLLM's other spellings of the same routes stay out of the OpenAPI document: one operation each
    route("/score", routes.score, "score")
    route("/v1/score", routes.score, "score", documented=False)
    route("/v1/rerank", routes.rerank, "rerank")
    for path in ("/rerank", "/v2/rerank"):
        route(path, routes.rerank, "rerank", documented=False)
    app.include_router(router)
