"""EngineClient, the API side of an engine, without a model."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from app.engine.client import EngineClient


def test_engine_callbacks_after_the_loop_closed_are_dropped():
    """A worker that dies or reports after the server's event loop closed (SIGTERM while a model loads) must not
    raise in its reader thread."""
    loop = asyncio.new_event_loop()
    engine = SimpleNamespace()
    EngineClient(engine, loop)
    loop.close()
    engine.on_dead("the worker process died")
    engine.on_outputs([], None)
