"""App factory. Nothing happens at import: `create_app(settings)` builds the app, the lifespan starts the
model registry (weights load in the background; `/ready` turns 200 when done) and stops it on shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api.auth import OPEN_PATHS, APIKeyMiddleware
from app.api.errors import install_error_handlers
from app.api.limits import Drain, RequestGuardMiddleware
from app.api.routes import chat, completions, health, metrics, models, tokenize
from app.config import Settings
from app.engine.registry import ModelRegistry
from app.metrics import HTTPMetricsMiddleware, Metrics
from app.tracing import Tracing

log = logging.getLogger("lanner")


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> FastAPI:
    registry = registry or ModelRegistry(settings)
    app_metrics = Metrics()
    registry.attach_metrics(app_metrics)
    registry.tracing = Tracing.for_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        try:
            yield
        finally:
            await registry.stop()
            if registry.tracing is not None:
                registry.tracing.shutdown()

    app = FastAPI(title="Lanner", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible inference server for Llama and Falcon on CPUs.")
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = app_metrics
    app.state.drain = Drain()
    install_error_handlers(app)
    app.openapi = lambda: _openapi_with_model_examples(app, registry)  # type: ignore[method-assign]
    for r in (health.router, metrics.router, models.router, completions.router, chat.router, tokenize.router):
        app.include_router(r)
    # Middleware, innermost first: body limits and drain, then auth, then CORS (answers preflights without
    # a key), then HTTP metrics outermost so every response is counted (401s, 413s and 503s too).
    app.add_middleware(RequestGuardMiddleware, drain=app.state.drain, max_body_bytes=settings.max_request_body_bytes,
                       max_json_depth=settings.max_json_depth, max_header_bytes=settings.max_header_bytes)
    api_keys = settings.all_api_keys()
    if api_keys:
        open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_public else set())
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys, open_paths=open_paths)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key"])
    app.add_middleware(HTTPMetricsMiddleware, metrics=app_metrics)
    return app


def _openapi_with_model_examples(app: FastAPI, registry: ModelRegistry) -> dict:
    """FastAPI's schema, with the served model ids as examples of every request's `model` field (so docs
    and schema-driven clients/fuzzers show ids that exist here)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        ids = [s.id for s in registry.settings.models] or list(registry.handles)
        for component in schema.get("components", {}).get("schemas", {}).values():
            model = component.get("properties", {}).get("model")
            if ids and model is not None and component.get("title", "").endswith("Request"):
                model["examples"] = ids
        app.openapi_schema = schema
    return app.openapi_schema
