"""App factory. Nothing happens at import: `create_app(settings)` builds the app, the lifespan starts the
model registry (weights load in the background; `/ready` turns 200 when done) and stops it on shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.auth import APIKeyMiddleware
from app.api.errors import install_error_handlers
from app.api.routes import chat, completions, health, models
from app.config import Settings
from app.engine.registry import ModelRegistry

log = logging.getLogger("lanner")


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> FastAPI:
    registry = registry or ModelRegistry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        try:
            yield
        finally:
            await registry.stop()

    app = FastAPI(title="Lanner", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible inference server for Llama and Falcon on CPUs.")
    app.state.settings = settings
    app.state.registry = registry
    install_error_handlers(app)
    for r in (health.router, models.router, completions.router, chat.router):
        app.include_router(r)
    if settings.api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys)
    return app
