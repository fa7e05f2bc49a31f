"""A server people can put on a network: limits, backpressure, deadlines, disconnect storms, graceful drain.

Most cases run against real `lanner serve` processes configured for them (small queues, short deadlines);
the rest against the shared API-test server. Every case asserts on content: status, OpenAI error shape,
headers, and afterwards the server's own /metrics (no leaked sequence, KV cache empty).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import start_server, stop_server
from tests.api.test_errors import assert_error
from tests.api.test_metrics import value
from tests.api.test_workers import workers as worker_pids
from tests.model.test_woq_checkpoint import write_random_llama

from prometheus_client.parser import text_string_to_metric_families


def metrics(base: str, headers: dict | None = None) -> dict:
    r = httpx.get(f"{base}/metrics", headers=headers or {})
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def wait_until_engine_idle(base: str, model: str, timeout: float = 60) -> dict:
    """Poll /metrics until the model has no running or waiting sequence and an empty KV cache."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base)
        state = [value(m, n, model_name=model) for n in
                 ("lanner_num_requests_running", "lanner_num_requests_waiting", "lanner_kv_cache_usage_ratio")]
        if state == [0, 0, 0]:
            return m
        assert time.monotonic() < deadline, f"engine of {model} not idle: running/waiting/kv = {state}"
        time.sleep(0.1)  # polling the server's own state, not waiting for time to pass


def completion(model: str, max_tokens: int, stream: bool = True, **kw) -> dict:
    return {"model": model, "prompt": "The sea", "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True, **kw}


async def read_stream(client: httpx.AsyncClient, body: dict) -> tuple[int, dict, list[dict]]:
    """POST a streaming completion; returns status, headers and the parsed SSE events."""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, dict(r.headers), [r.json()]
        events = []
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
        return 200, dict(r.headers), events


# ------------------------------------------------------------------ queue limits, storm, drain


@pytest.fixture(scope="module")
def hserver(tmp_path_factory, demo_models_dir):
    root = tmp_path_factory.mktemp("hardening")
    cfg = root / "models.yaml"
    cfg.write_text(
        "models:\n"
        f"  - {{id: tiny-queue, source: {demo_models_dir / 'demo-llama'}, max_num_seqs: 1, max_waiting_requests: 1}}\n"
        f"  - {{id: storm, source: {demo_models_dir / 'demo-falcon'}, max_num_seqs: 16,"
        " max_waiting_requests: 256}\n")
    proc, base = start_server(["--config", str(cfg)], root / "server.log", env={"LANNER_DRAIN_TIMEOUT": "60"})
    yield proc, base
    stop_server(proc)


async def test_full_queue_is_429_with_retry_after(hserver):
    _, base = hserver
    before = metrics(base)
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        results = await asyncio.gather(*[read_stream(c, completion("tiny-queue", 200)) for _ in range(6)])
    statuses = [s for s, _, _ in results]
    # one slot + one waiting place: a burst of 6 leaves at least 3 refused, each before any byte is streamed
    assert statuses.count(429) >= 3 and statuses.count(200) >= 2, statuses
    for status, headers, events in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert events[0]["error"]["type"] == "rate_limit_error" and events[0]["error"]["code"] == "queue_full"
        else:  # accepted requests are served in full
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert "".join(e["choices"][0]["text"] for e in events)
    after = wait_until_engine_idle(base, "tiny-queue")
    rejected = value(after, "lanner_requests_failed_total", model_name="tiny-queue", reason="rejected") - \
        value(before, "lanner_requests_failed_total", model_name="tiny-queue", reason="rejected")
    assert rejected == statuses.count(429)


async def test_disconnect_storm_leaves_nothing_behind(hserver):
    """200 streaming clients that hang up mid-stream (a quarter right after the headers): afterwards no
    running or waiting sequence and an empty KV cache, read from /metrics; the server still serves."""
    _, base = hserver
    before = metrics(base)

    async def drop(i: int, c: httpx.AsyncClient) -> bool:
        async with c.stream("POST", "/v1/completions", json=completion("storm", 500)) as r:
            assert r.status_code == 200
            if i % 4 == 0:
                return False
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    return True  # got some text: hang up now
        raise AssertionError("stream ended before the client dropped it")

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        got_text = await asyncio.gather(*[drop(i, c) for i in range(200)])
    assert sum(got_text) == 150
    after = wait_until_engine_idle(base, "storm")
    aborted = value(after, "lanner_requests_finished_total", model_name="storm", finished_reason="abort") - \
        value(before, "lanner_requests_finished_total", model_name="storm", finished_reason="abort")
    assert aborted == 200
    r = httpx.post(f"{base}/v1/completions", json=completion("storm", 5, stream=False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


async def test_sigterm_drains_in_flight_then_exits_0(hserver):
    """Runs last in the module: it stops the server."""
    proc, base = hserver
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        async with c.stream("POST", "/v1/completions",
                            json=completion("storm", 800, stream_options={"include_usage": True})) as r:
            lines = r.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break  # the stream is under way
            proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=base, timeout=10) as other:
                deadline = time.monotonic() + 30
                while (ready := await other.get("/ready")).status_code != 503:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)  # polling readiness
                assert ready.json()["status"] == "draining"
                refused = await other.post("/v1/completions", json=completion("storm", 5, stream=False))
                assert_error(refused, 503, code="shutting_down")
                assert int(refused.headers["retry-after"]) >= 1
                assert (await other.get("/health")).status_code == 200  # alive while draining
            events = [json.loads(line[6:]) async for line in lines
                      if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[-1]["usage"]["completion_tokens"] == 800  # the in-flight request finished in full
    assert [e for e in events if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(60) == 0
    for pid in workers:  # gone, or a zombie waiting for PID 1 to reap it: not running anyway
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", f"worker {pid} outlived the server"


# ------------------------------------------------------------------ deadlines


SLOW_CONTEXT = 8192


def save_slow_model(out: Path, demo_models_dir: Path) -> Path:
    """A demo-tokenizer Llama big enough (16M parameters, 8k context) that its longest generation takes
    many times the test's deadline on any CPU, so the deadline cuts it whatever the machine's speed."""
    write_random_llama(out, demo_models_dir / "demo-llama", hidden_size=512, intermediate_size=2048,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                       max_position_embeddings=SLOW_CONTEXT)
    return out


@pytest.fixture(scope="module")
def tserver(tmp_path_factory, demo_models_dir):
    root = tmp_path_factory.mktemp("deadlines")
    slow = save_slow_model(root / "slow-llama", demo_models_dir)
    cfg = root / "models.yaml"
    cfg.write_text(f"models:\n  - {{id: slow, source: {slow}, max_num_seqs: 1, max_model_len: {SLOW_CONTEXT}}}\n")
    proc, base = start_server(["--config", str(cfg)], root / "server.log",
                              env={"LANNER_QUEUE_TIMEOUT": "0.5", "LANNER_REQUEST_TIMEOUT": "2"})
    yield proc, base
    stop_server(proc)


async def test_queue_timeout_and_request_timeout(tserver):
    """One slot. A holds it generating ~8000 tokens (tens of seconds) and is cut at the 2 s request
    deadline with an error event; B, queued behind it, gives up after the 0.5 s queue timeout."""
    _, base = tserver
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        async with c.stream("POST", "/v1/completions", json=completion("slow", SLOW_CONTEXT - 100)) as a:
            lines = a.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break
            t0 = time.monotonic()
            b = await c.post("/v1/completions", json=completion("slow", 5, stream=False))
            waited = time.monotonic() - t0
            err = assert_error(b, 504, code="queue_timeout")
            assert err["type"] == "timeout_error" and waited < 1.9
            tail = [line async for line in lines if line.startswith("data: ")]
    assert tail[-1] == "data: [DONE]"
    error = json.loads(tail[-2][6:])["error"]
    assert error["code"] == "request_timeout", tail[-2]
    m = wait_until_engine_idle(base, "slow")
    assert value(m, "lanner_requests_failed_total", model_name="slow", reason="timeout") == 2
    ok = httpx.post(f"{base}/v1/completions", json=completion("slow", 3, stream=False), timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------ request limits (shared server)


def test_body_over_2mb_is_413(http):
    big = json.dumps({"model": "demo-llama", "prompt": "a " * (1024 * 1024 + 10), "max_tokens": 1})
    assert_error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        for _ in range(3):
            yield b" " * (1024 * 1024)

    assert_error(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                 413, code="request_too_large")


def test_deep_json_is_400(http):
    deep = b'{"model": "demo-llama", "max_tokens": 1, "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    err = assert_error(http.post("/v1/completions", content=deep, headers={"content-type": "application/json"}), 400)
    assert "nests deeper" in err["message"]


def test_oversized_headers_are_refused(server):
    for headers in ({"x-big": "a" * 100_000}, {f"x-h{i}": "v" for i in range(500)}):
        r = httpx.get(f"{server.base_url}/health", headers=headers)
        assert r.status_code in (400, 431), r.status_code  # 400: h11's own limit when headers come in pieces
        if r.status_code == 431:
            assert_error(r, 431, code="headers_too_large")
    assert httpx.get(f"{server.base_url}/health").status_code == 200


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "demo-llama", "prompt": "\xff\xfe", "max_tokens": 1}', None),
    (b'{"model": "demo-llama", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    (b'{"model": "demo-llama", "prompt": "a", "stop": ["\\udfff"], "max_tokens": 1}', "stop[0]"),
])
def test_invalid_text_is_400(http, raw, param):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param=param)


def test_lone_surrogate_in_chat_is_400(http):
    raw = b'{"model": "demo-llama", "messages": [{"role": "user", "content": "x\\udc00"}], "max_tokens": 1}'
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param="messages[0].content")


def test_request_supplied_chat_template_is_refused(http):
    r = http.post("/v1/chat/completions", json={"model": "demo-llama", "max_tokens": 1,
                                                 "messages": [{"role": "user", "content": "hi"}],
                                                 "chat_template": "{{ cycler.__init__.__globals__ }}"})
    assert_error(r, 400, param="chat_template")


def test_null_bytes_are_plain_text(http):
    r = http.post("/v1/completions", json={"model": "demo-llama", "prompt": "a\x00b", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_schemathesis_finds_no_server_error(tmp_path, demo_models_dir):
    """Schemathesis against /openapi.json, positive and negative modes, NUL bytes allowed: 0 responses >= 500.
    The server caps context at 64 tokens so generated requests stay short; examples per operation bounded."""
    st = Path(os.sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n" + "".join(
        f"  - {{id: {m}, source: {demo_models_dir / m}, max_model_len: 64}}\n" for m in ("demo-llama", "demo-falcon")))
    proc, base = start_server(["--config", str(cfg)], tmp_path / "server.log")
    try:
        import subprocess

        out = subprocess.run(
            [str(st), "run", f"{base}/openapi.json", "--checks", "not_a_server_error", "--mode", "all",
             "--max-examples", os.environ.get("LANNER_FUZZ_EXAMPLES", "15"), "--generation-allow-x00", "true",
             "--seed", "7", "--workers", "1", "--request-timeout", "60"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
        tail = out.stdout[-3000:]
        assert out.returncode == 0, tail
        assert " 500 " not in (tmp_path / "server.log").read_text()
        assert "passed" in tail
        ok = httpx.post(f"{base}/v1/completions", json={"model": "demo-llama", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
        wait_until_engine_idle(base, "demo-llama")
        wait_until_engine_idle(base, "demo-falcon")
    finally:
        assert stop_server(proc) == 0
