"""API-side handle of an engine: `add_request()` yields Deltas as the engine produces them.

The engine thread hands each Delta to the request's asyncio queue with `call_soon_threadsafe`; leaving the
iterator early (client disconnect, cancelled task) aborts the request so its KV space is freed at the
engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.engine.types import Delta, SamplingParams
from app.engine.worker import EngineCore


class EngineDeadError(RuntimeError):
    pass


class EngineClient:
    def __init__(self, core: EngineCore, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        self._loop = loop
        self._queues: dict[str, asyncio.Queue[Delta | BaseException]] = {}
        core.emit = self._emit_threadsafe

    def _emit_threadsafe(self, request_id: str, item: Delta | BaseException) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, item)

    async def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id}")
        q: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            self._core.add_request(request_id, prompt_ids, params)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise EngineDeadError(f"engine failed while serving the request: {item}") from item
                finished = item.is_finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._core.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._core.abort(request_id)

    @property
    def num_unfinished(self) -> int:
        return self._core.num_unfinished
