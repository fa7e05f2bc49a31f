"""OpenTelemetry tracing, on when an OTLP endpoint is configured: a real server exports to a minimal OTLP/HTTP
receiver run by the test; each request arrives as receive -> queue -> prefill -> decode under one root span."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.api.conftest import free_port, start_server, stop_server

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the otel extra")


class Receiver(ThreadingHTTPServer):
    def __init__(self, port: int) -> None:
        self.spans: list = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                body = self.rfile.read(int(self.headers["content-length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                outer.paths.append(self.path)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        outer.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)


def test_request_spans_reach_the_collector(tmp_path, demo_models_dir):
    port = free_port()
    receiver = Receiver(port)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    cfg = tmp_path / "models.yaml"
    cfg.write_text(f"models:\n  - {{id: traced, source: {demo_models_dir / 'demo-llama'}}}\n")
    proc, base = start_server(["--config", str(cfg)], tmp_path / "server.log", env={
        "LANNER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        for n in (3, 6):
            r = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"model": "traced", "prompt": "trace me", "max_tokens": n, "ignore_eos": True})
            assert r.status_code == 200
        deadline = time.monotonic() + 30
        while len(receiver.spans) < 10:
            assert time.monotonic() < deadline, f"only {len(receiver.spans)} spans arrived"
            time.sleep(0.05)  # polling the receiver
    finally:
        assert stop_server(proc) == 0
        receiver.shutdown()
    assert set(receiver.paths) == {"/v1/traces"}
    roots = [s for s in receiver.spans if s.name == "lanner.request"]
    assert len(roots) == 2
    for root in roots:
        attrs = {a.key: a.value for a in root.attributes}
        assert attrs["lanner.model"].string_value == "traced"
        assert attrs["lanner.finish_reason"].string_value == "length"
        kids = sorted((s for s in receiver.spans if s.parent_span_id == root.span_id),
                      key=lambda s: s.start_time_unix_nano)
        assert [k.name for k in kids] == ["receive", "queue", "prefill", "decode"]
        assert all(k.trace_id == root.trace_id for k in kids)
        assert root.start_time_unix_nano <= kids[0].start_time_unix_nano
        for a, b in zip(kids, kids[1:]):  # the phases follow one another
            assert a.end_time_unix_nano <= b.start_time_unix_nano + 1000
        assert kids[-1].end_time_unix_nano <= root.end_time_unix_nano
    gen = sorted({a.key: a.value for a in r.attributes}["lanner.generation_tokens"].int_value for r in roots)
    assert gen == [3, 6]
