"""OpenTelemetry tracing of requests, opt-in (`otlp_traces_endpoint` / LANNER_OTLP_TRACES_ENDPOINT).

Off by default, and then free: no OpenTelemetry import, `Tracing.for_settings` returns None and the request
path checks one attribute. When on, every finished engine request becomes a trace

    lanner.request                  arrival at the API -> last token
      ├─ receive                    parsing, tokenizing, handing to the engine
      ├─ queue                      waiting for a KV slot in the engine
      ├─ prefill                    first scheduled -> first token
      └─ decode                     first token -> last token

built when the request finishes from the engine's own timings (`FinishedStats`), exported over OTLP/HTTP
by a batch processor (needs the `otel` extra: opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http).
"""

from __future__ import annotations

import time
from typing import Any

from app.engine.types import FinishedStats


class Tracing:
    def __init__(self, endpoint: str, service_name: str = "lanner") -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("tracing needs the otel extra: pip install 'lanner[otel]'") from exc
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer("lanner")

    @classmethod
    def for_settings(cls, settings: Any) -> Tracing | None:
        endpoint = getattr(settings, "otlp_traces_endpoint", None)
        return cls(endpoint) if endpoint else None

    def record(self, model: str, request_id: str, arrival_mono: float, stats: FinishedStats,
               attributes: dict[str, Any] | None = None) -> None:
        """Emit the spans of one finished request; engine timings are laid out backwards from now."""
        from opentelemetry import trace

        now_mono, now_ns = time.monotonic(), time.time_ns()

        def ns(mono: float) -> int:
            return now_ns - int((now_mono - mono) * 1e9)

        decode_s, prefill_s = stats.decode_s or 0.0, stats.prefill_s or 0.0
        t_decode = now_mono - decode_s
        t_prefill = t_decode - prefill_s
        t_queue = max(arrival_mono, t_prefill - stats.queue_s)
        root = self._tracer.start_span("lanner.request", start_time=ns(arrival_mono), attributes={
            "lanner.model": model, "lanner.request_id": request_id,
            "lanner.finish_reason": stats.finish_reason.value,
            "lanner.prompt_tokens": stats.num_prompt_tokens, "lanner.generation_tokens": stats.num_output_tokens,
            **(attributes or {})})
        ctx = trace.set_span_in_context(root)
        for name, start, end in (("receive", arrival_mono, t_queue), ("queue", t_queue, t_prefill),
                                 ("prefill", t_prefill, t_decode), ("decode", t_decode, now_mono)):
            self._tracer.start_span(name, context=ctx, start_time=ns(start)).end(end_time=ns(max(start, end)))
        root.end(end_time=now_ns)

    def shutdown(self) -> None:
        self._provider.shutdown()  # flushes what the batch processor still holds
