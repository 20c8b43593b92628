"""The FastAPI app of the api process: native routes, health, metrics, adapter routes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.server.drain import Drain, DrainMiddleware
from lightllm_plugin.server.engine_client import AsyncEngineClient
from lightllm_plugin.server.http_util import LimitBodySize, RequireApiKey, shaped_error_body
from lightllm_plugin.server.metrics_vllm import render_vllm

logger = logging.getLogger(__name__)

# routes that --api_key leaves open: liveness probes carry no key. /metrics is not among them:
# its counts describe the traffic, and Prometheus sends a bearer token (`authorization` in a
# scrape config)
OPEN_PATHS = frozenset({"/health", "/healthz"})


def create_app(
    client: AsyncEngineClient,
    config: EngineConfig,
    pipeline_alive: Callable[[], bool] = lambda: True,
    plugins=None,
    drain: Drain | None = None,
) -> FastAPI:
    """The app: health and metrics here; every other route (the native API, /v1, third-party
    routes) comes from a plugin's `register_routes` hook. `plugins`: a loaded
    PluginManager (default: load them now). `drain`: the launcher's shutdown state, whose
    middleware refuses new requests once a drain has begun."""
    from lightllm_plugin.plugins import load_plugins

    if plugins is None:
        plugins = load_plugins()
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="lightllm-plugin", lifespan=lifespan)
    app.state.client = client
    app.state.config = config
    app.state.plugins = plugins
    # added last runs first: the key is checked before a large body is read
    app.add_middleware(LimitBodySize, max_bytes=config.max_body_size)
    if config.api_key:
        app.add_middleware(RequireApiKey, api_key=config.api_key, open_paths=OPEN_PATHS)
    if drain is not None:  # outermost: a draining server refuses before reading anything
        app.add_middleware(DrainMiddleware, drain=drain)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        # unknown paths and methods: the error in the shape of the API the path belongs to
        body = shaped_error_body(request.url.path, exc.status_code, str(exc.detail))
        return Response(body, status_code=exc.status_code, media_type="application/json", headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        # the traceback goes to the server's log (Starlette logs it), never to the client
        body = shaped_error_body(request.url.path, 500, "internal server error")
        return Response(body, status_code=500, media_type="application/json")

    # HEAD answers as GET does; it stays out of the OpenAPI document, where one route with both
    # methods would give two operations the same operationId
    @app.get("/health")
    @app.get("/healthz")
    @app.head("/health", include_in_schema=False)
    @app.head("/healthz", include_in_schema=False)
    async def health():
        if client.alive and pipeline_alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        # ours, then the same figures under vLLM's names, which gateways and autoscalers read
        text = client.metrics.render() + render_vllm(client.metrics, config.model_name())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    plugins.call_each("register_routes", app=app, engine=client, config=config)
    return app
