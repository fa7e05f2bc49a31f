"""uvicorn with a graceful drain on SIGTERM.

On the first SIGTERM: `/ready` turns 503 and new API requests get 503 (the load balancer moves on), while
requests in flight keep streaming; once none is left, or `drain_timeout` has passed, uvicorn shuts down as
usual (closes connections, runs the lifespan shutdown that stops the model workers) and the process exits 0.
A second SIGTERM, or SIGINT (Ctrl-C), skips the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings

log = logging.getLogger("lanner")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = self.app.state.drain
        if sig == signal.SIGTERM and not drain.draining and self.drain_timeout > 0 and self._loop is not None:
            drain.begin()  # a plain flag: safe to set from the signal handler
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        self.should_exit = True  # second signal, Ctrl-C, or no drain configured
        if sig == signal.SIGINT and drain.draining:
            self.force_exit = True

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        drain = self.app.state.drain
        log.info("SIGTERM: draining %d in-flight request(s) (up to %.0fs)", drain.in_flight, self.drain_timeout)
        if not await drain.wait_idle(self.drain_timeout):
            log.warning("drain timeout: %d request(s) still in flight are cut off", drain.in_flight)
        self.should_exit = True


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                          timeout_graceful_shutdown=5, h11_max_incomplete_event_size=settings.max_header_bytes,
                          timeout_keep_alive=max(1, round(settings.keep_alive_timeout)))


def run(app: FastAPI, settings: Settings) -> None:
    DrainingServer(uvicorn_config(app, settings), app, settings.drain_timeout).run()
