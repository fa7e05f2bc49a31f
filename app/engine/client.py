"""API-side handle of an engine: `add_request()` yields Deltas as the engine produces them.

The engine (a worker process or a thread) delivers each step's outputs as one batch from its reader
thread; one `call_soon_threadsafe` per step routes them to the requests' asyncio queues. A stream whose consumer falls behind gets its pending deltas
merged into one, so a slow client or a busy event loop costs fewer, larger SSE chunks instead of a growing
backlog. Leaving the
iterator early (client disconnect, cancelled task) aborts the request, which frees its KV slot at the
engine's next step. If the engine dies, every open request fails at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from app.engine.types import Delta, SamplingParams, StepStats

if TYPE_CHECKING:
    from app.metrics import ModelMetrics
    from app.tracing import Tracing


class EngineDeadError(RuntimeError):
    pass


def _merge(a: Delta, b: Delta | str) -> Delta | str:
    """Fold a later delta into an earlier one (an error wins)."""
    if isinstance(b, str):
        return b
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return Delta(a.text + b.text, a.token_ids + b.token_ids, b.finish_reason, b.num_prompt_tokens,
                 b.num_output_tokens, b.stats, logprobs=logprobs,
                 prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
                 num_cached_tokens=b.num_cached_tokens)


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run `fn(*args)` on the event loop from an engine's thread; nothing when the loop is closed already (the
    server stopped while a worker was still loading or stepping: nobody waits for its outputs)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # "Event loop is closed"
        if not loop.is_closed():
            raise


class EngineBackend(Protocol):
    on_outputs: object
    on_dead: object

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def abort(self, request_id: str) -> None: ...


class EngineClient:
    def __init__(self, engine: EngineBackend, loop: asyncio.AbstractEventLoop,
                 metrics: ModelMetrics | None = None, tracing: Tracing | None = None, model: str = "") -> None:
        self.engine = engine
        self._loop = loop
        self._queues: dict[str, asyncio.Queue[Delta | str]] = {}
        self.dead_reason: str | None = None
        self.metrics = metrics
        self.tracing = tracing  # app.tracing.Tracing when OTLP tracing is configured, else None
        self.model = model
        self.last_stats: StepStats | None = None
        engine.on_outputs = lambda batch, stats: _post(loop, self._dispatch, batch, stats)
        engine.on_dead = lambda reason: _post(loop, self._fail_all, reason)

    def _dispatch(self, batch: list[tuple[str, Delta | str]], stats: StepStats) -> None:
        self.last_stats = stats
        if self.metrics is not None:
            self.metrics.record_step(stats)
        for request_id, item in batch:
            q = self._queues.get(request_id)
            if q is not None:
                q.put_nowait(item)

    def _fail_all(self, reason: str) -> None:
        self.dead_reason = reason
        if self.metrics is not None:
            self.metrics.ready.set(0)
        for q in self._queues.values():
            q.put_nowait(reason)

    async def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None
    ) -> AsyncIterator[Delta]:
        """Yield the request's Deltas. `arrival` (time.monotonic() when the HTTP request came in) is where
        time to first token and end-to-end latency start."""
        arrival = time.monotonic() if arrival is None else arrival
        first = True
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id}")
        q: asyncio.Queue[Delta | str] = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            self.engine.add_request(request_id, prompt_ids, params)
            while True:
                item = await q.get()
                while not q.empty() and isinstance(item, Delta) and not item.is_finished:
                    item = _merge(item, q.get_nowait())  # the consumer fell behind: one chunk, not many
                if isinstance(item, str):  # the engine failed this request (or died)
                    finished = True
                    raise EngineDeadError(item)
                finished = item.is_finished
                if self.metrics is not None:
                    if first and item.token_ids:
                        first = False
                        self.metrics.ttft.observe(time.monotonic() - arrival)
                    if finished:
                        self.metrics.e2e.observe(time.monotonic() - arrival)
                if finished and self.tracing is not None and item.stats is not None:
                    self.tracing.record(self.model, request_id, arrival, item.stats)
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    @property
    def num_open_requests(self) -> int:
        return len(self._queues)
