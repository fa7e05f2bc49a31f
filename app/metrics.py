"""Prometheus metrics: the one module that owns them (names and meanings: docs/metrics.md).

Every app gets its own `CollectorRegistry`, so tests (or two apps in one process) never share series.
The engine emits plain `StepStats`; `ModelMetrics.record_step` turns them into series. The API side adds
what only it can see: time to first token and end-to-end latency as the client experiences them, failures,
and HTTP request metrics (`HTTPMetricsMiddleware`, pure ASGI).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.engine.types import FinishReason, StepStats

FAILURE_REASONS = ("invalid_request", "rejected", "timeout", "engine_error", "unavailable")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_STEP_TOKENS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_HTTP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_MODEL = ["model_name"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.ttft = Histogram("lanner_time_to_first_token_seconds", "Request received to first token.",
                              _MODEL, buckets=_TTFT, registry=r)
        self.itl = Histogram("lanner_inter_token_latency_seconds", "Time between consecutive tokens.",
                             _MODEL, buckets=_ITL, registry=r)
        self.e2e = Histogram("lanner_e2e_request_latency_seconds", "Request received to last token.",
                             _MODEL, buckets=_LATENCY, registry=r)
        self.queue = Histogram("lanner_request_queue_time_seconds", "Arrival at the engine to first scheduled.",
                               _MODEL, buckets=_LATENCY, registry=r)
        self.prefill = Histogram("lanner_request_prefill_time_seconds", "First scheduled to first token.",
                                 _MODEL, buckets=_LATENCY, registry=r)
        self.decode = Histogram("lanner_request_decode_time_seconds", "First token to last token.",
                                _MODEL, buckets=_LATENCY, registry=r)
        self.req_prompt = Histogram("lanner_request_prompt_tokens", "Prompt tokens per finished request.",
                                    _MODEL, buckets=_TOKENS, registry=r)
        self.req_gen = Histogram("lanner_request_generation_tokens", "Generated tokens per finished request.",
                                 _MODEL, buckets=_TOKENS, registry=r)
        self.prompt_tokens = Counter("lanner_prompt_tokens", "Prompt tokens prefilled.", _MODEL, registry=r)
        self.cached_tokens = Counter("lanner_prompt_tokens_cached", "Prompt tokens reused from the KV cache "
                                     "(prefix caching) instead of prefilled.", _MODEL, registry=r)
        self.gen_tokens = Counter("lanner_generation_tokens", "Tokens generated.", _MODEL, registry=r)
        self.finished = Counter("lanner_requests_finished", "Sequences that left the engine, by reason.",
                                [*_MODEL, "finished_reason"], registry=r)
        self.failed = Counter("lanner_requests_failed", "Requests for a known model answered with an error.",
                              [*_MODEL, "reason"], registry=r)
        self.running = Gauge("lanner_num_requests_running", "Sequences holding a KV slot.", _MODEL, registry=r)
        self.waiting = Gauge("lanner_num_requests_waiting", "Accepted requests not yet running.", _MODEL,
                             registry=r)
        self.kv_usage = Gauge("lanner_kv_cache_usage_ratio", "Fraction of the KV cache in use.", _MODEL,
                              registry=r)
        self.batch = Histogram("lanner_batch_size", "Sequences in one engine step.", _MODEL, buckets=_BATCH,
                               registry=r)
        self.step_tokens = Histogram("lanner_step_batched_tokens", "Tokens in one engine step.", _MODEL,
                                     buckets=_STEP_TOKENS, registry=r)
        self.step_time = Histogram("lanner_engine_step_duration_seconds", "Wall time of one engine step.",
                                   _MODEL, buckets=_ITL, registry=r)
        self.load_time = Gauge("lanner_model_load_seconds", "Time to load the model.", _MODEL, registry=r)
        self.ready = Gauge("lanner_model_ready", "1 when the model serves.", _MODEL, registry=r)
        self.info = Info("lanner_model", "What a served model runs on.", _MODEL, registry=r)
        self.http_total = Counter("lanner_http_requests", "HTTP requests.", ["method", "handler", "status"],
                                  registry=r)
        self.http_time = Histogram("lanner_http_request_duration_seconds", "HTTP request duration.",
                                   ["method", "handler"], buckets=_HTTP, registry=r)
        self.http_in_progress = Gauge("lanner_http_requests_in_progress", "HTTP requests being served.",
                                      ["method", "handler"], registry=r)
        ProcessCollector(registry=r)
        self._workers: dict[str, Callable[[], int | None]] = {}
        r.register(_WorkerCollector(self._workers))
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        m = self._models.get(name)
        if m is None:
            m = self._models[name] = ModelMetrics(self, name)
        return m

    def watch_worker(self, model_name: str, pid: Callable[[], int | None]) -> None:
        """Export RSS and CPU time of the model's worker process (pid read at every scrape)."""
        self._workers[model_name] = pid

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelMetrics:
    """The series of one model, label children bound once (the hot path is `record_step`)."""

    def __init__(self, m: Metrics, name: str) -> None:
        self.name = name
        lbl = {"model_name": name}
        self.ttft, self.itl, self.e2e = m.ttft.labels(**lbl), m.itl.labels(**lbl), m.e2e.labels(**lbl)
        self.queue, self.prefill, self.decode = (m.queue.labels(**lbl), m.prefill.labels(**lbl),
                                                 m.decode.labels(**lbl))
        self.req_prompt, self.req_gen = m.req_prompt.labels(**lbl), m.req_gen.labels(**lbl)
        self.prompt_tokens, self.gen_tokens = m.prompt_tokens.labels(**lbl), m.gen_tokens.labels(**lbl)
        self.cached_tokens = m.cached_tokens.labels(**lbl)
        self.finished = {r: m.finished.labels(name, r.value) for r in FinishReason}  # all exist at 0
        self.failed = {r: m.failed.labels(name, r) for r in FAILURE_REASONS}
        self.running, self.waiting, self.kv_usage = (m.running.labels(**lbl), m.waiting.labels(**lbl),
                                                     m.kv_usage.labels(**lbl))
        self.batch, self.step_tokens, self.step_time = (m.batch.labels(**lbl), m.step_tokens.labels(**lbl),
                                                        m.step_time.labels(**lbl))
        self.load_time, self.ready, self.info = (m.load_time.labels(**lbl), m.ready.labels(**lbl),
                                                 m.info.labels(**lbl))

    def record_step(self, s: StepStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_usage)
        if s.batch_size:
            self.batch.observe(s.batch_size)
            self.step_tokens.observe(s.num_batched_tokens)
            self.step_time.observe(s.step_s)
            if s.num_prompt_tokens:
                self.prompt_tokens.inc(s.num_prompt_tokens)
            if s.num_generation_tokens:
                self.gen_tokens.inc(s.num_generation_tokens)
            for v in s.inter_token_s:
                self.itl.observe(v)
        for f in s.finished:
            self.finished[f.finish_reason].inc()
            self.queue.observe(f.queue_s)
            if f.prefill_s is not None:
                self.prefill.observe(f.prefill_s)
            if f.decode_s is not None:
                self.decode.observe(f.decode_s)
            self.req_prompt.observe(f.num_prompt_tokens)
            if f.num_cached_tokens:
                self.cached_tokens.inc(f.num_cached_tokens)
            self.req_gen.observe(f.num_output_tokens)

    def fail(self, reason: str) -> None:
        self.failed[reason].inc()

    def loaded(self, seconds: float, info: dict[str, Any]) -> None:
        self.load_time.set(seconds)
        self.info.info({k: str(v) for k, v in info.items()})
        self.ready.set(1)


class _WorkerCollector:
    """RSS and CPU seconds of each model's worker process, read from /proc at scrape time."""

    def __init__(self, workers: dict[str, Callable[[], int | None]]) -> None:
        self._workers = workers
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def describe(self) -> Iterable[Any]:
        return []  # series appear only once a worker exists

    def collect(self) -> Iterable[Any]:
        rss = GaugeMetricFamily("lanner_worker_resident_memory_bytes", "RSS of the model's worker process.",
                                labels=_MODEL)
        cpu = CounterMetricFamily("lanner_worker_cpu_seconds", "CPU time of the model's worker process.",
                                  labels=_MODEL)
        for name, pid_of in list(self._workers.items()):
            pid = pid_of()
            if not pid:
                continue
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
            except (OSError, IndexError, ValueError):
                continue
            rss.add_metric([name], rss_pages * self._page)
            cpu.add_metric([name], (utime + stime) / self._tick)
        yield rss
        yield cpu


class HTTPMetricsMiddleware:
    """Count and time every HTTP request by route template (`handler`), never by raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.m = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        status = 500
        t0 = time.perf_counter()
        in_progress = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            # the route is known only after routing; count in-progress under the raw path's handler guess
            in_progress = self.m.http_in_progress.labels(method, _handler(scope, before=True))
            in_progress.inc()
            await self.app(scope, receive, send_wrapper)
        finally:
            handler = _handler(scope)
            if in_progress is not None:
                in_progress.dec()
            self.m.http_total.labels(method, handler, str(status)).inc()
            self.m.http_time.labels(method, handler).observe(time.perf_counter() - t0)


_KNOWN = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics",
                    "/openapi.json", "/docs", "/redoc"})


def _handler(scope: Scope, before: bool = False) -> str:
    route = None if before else scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    raw = scope.get("path", "")
    if raw in _KNOWN:
        return raw
    return "/v1/models/{model_id}" if raw.startswith("/v1/models/") else "other"
