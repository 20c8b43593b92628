"""The FastAPI app of the api process: native routes, health, metrics, adapter routes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.server.engine_client import AsyncEngineClient
from lightllm_plugin.server.http_util import RequireApiKey
from lightllm_plugin.server.native import native_routes

logger = logging.getLogger(__name__)

# an adapter adds its routes with hook(app, client, config)
RouteHook = Callable[[FastAPI, AsyncEngineClient, EngineConfig], None]

# routes that --api_key leaves open: probes and scrapers carry no key
OPEN_PATHS = frozenset({"/health", "/healthz", "/metrics"})


def builtin_route_hooks() -> list[RouteHook]:
    """The adapters that ship with the server (until the plugin manager registers them)."""
    from lightllm_plugin.adapters.openai import register_routes

    return [register_routes]


def create_app(
    client: AsyncEngineClient,
    config: EngineConfig,
    pipeline_alive: Callable[[], bool] = lambda: True,
    route_hooks: Iterable[RouteHook] = (),
) -> FastAPI:
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
    if config.api_key:
        app.add_middleware(RequireApiKey, api_key=config.api_key, open_paths=OPEN_PATHS)

    @app.api_route("/health", methods=["GET", "HEAD"])
    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def health():
        if client.alive and pipeline_alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(client.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(native_routes(client))
    for hook in route_hooks:
        hook(app, client, config)
    return app
