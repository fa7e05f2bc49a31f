"""/metrics on the real server: every documented metric is exported, and the numbers follow the traffic."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
MODEL = "demo-llama"


def scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples, name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    return sum(v for (n, lbl), v in samples.items() if n == name and set(want) <= set(lbl))


def documented_metrics() -> list[str]:
    names = re.findall(r"^\| `(lanner_[a-z_]+)`", DOC.read_text(), flags=re.M)
    assert len(names) >= 25, names
    return names


def test_metrics_needs_the_api_key(server):
    r = httpx.get(f"{server.base_url}/metrics")
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


def test_every_documented_metric_is_exported(http, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    samples = scrape(http)
    exported = {n for n, _ in samples}
    missing = []
    for name in documented_metrics():
        candidates = {name, f"{name}_total", f"{name}_bucket", f"{name}_info"}
        if not candidates & exported:
            missing.append(name)
    assert not missing, f"documented but not exported: {missing}"
    info = [lbl for (n, lbl) in samples if n == "lanner_model_info"]
    assert any(dict(lbl).get("model_name") == MODEL and dict(lbl).get("quantization") == "none"
               and dict(lbl).get("kernel") and dict(lbl).get("kv_cache_dtype") == "float32" for lbl in info), info
    assert value(samples, "lanner_model_ready", model_name=MODEL) == 1
    assert value(samples, "lanner_worker_resident_memory_bytes", model_name=MODEL) > 10e6
    # every reason exists at 0 before it ever happens
    for reason in ("stop", "length", "abort"):
        assert ("lanner_requests_finished_total", (("finished_reason", reason), ("model_name", MODEL))) in samples
    for reason in ("invalid_request", "rejected", "timeout", "engine_error", "unavailable"):
        assert ("lanner_requests_failed_total", (("model_name", MODEL), ("reason", reason))) in samples


def test_counters_follow_the_traffic(http, client):
    before = scrape(http)
    out = client.completions.create(model=MODEL, prompt="count these tokens", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    bad = client.completions.with_raw_response  # a 400 for a known model counts as a failure
    try:
        bad.create(model=MODEL, prompt="x", max_tokens=10**6)
    except Exception as exc:  # openai.BadRequestError
        assert getattr(exc, "status_code", None) == 400
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    usage = chunks[-1].usage
    assert delta("lanner_generation_tokens_total", model_name=MODEL) == 7 + 5
    cached = out.usage.prompt_tokens_details.cached_tokens + usage.prompt_tokens_details.cached_tokens
    assert delta("lanner_prompt_tokens_total", model_name=MODEL) == \
        out.usage.prompt_tokens + usage.prompt_tokens - cached
    assert delta("lanner_prompt_tokens_cached_total", model_name=MODEL) == cached
    assert delta("lanner_requests_finished_total", model_name=MODEL, finished_reason="length") == 2
    assert delta("lanner_requests_failed_total", model_name=MODEL, reason="invalid_request") == 1
    for hist in ("lanner_time_to_first_token_seconds", "lanner_e2e_request_latency_seconds",
                 "lanner_request_queue_time_seconds", "lanner_request_prefill_time_seconds",
                 "lanner_request_decode_time_seconds", "lanner_request_generation_tokens"):
        assert delta(f"{hist}_count", model_name=MODEL) == 2, hist
    assert delta("lanner_request_generation_tokens_sum", model_name=MODEL) == 12
    assert delta("lanner_inter_token_latency_seconds_count", model_name=MODEL) == 6 + 4
    assert delta("lanner_batch_size_count", model_name=MODEL) >= 7 + 5
    assert value(after, "lanner_num_requests_running", model_name=MODEL) == 0
    assert value(after, "lanner_num_requests_waiting", model_name=MODEL) == 0
    assert value(after, "lanner_kv_cache_usage_ratio", model_name=MODEL) == 0
    assert delta("lanner_http_requests_total", handler="/v1/completions", status="200", method="POST") == 1
    assert delta("lanner_http_requests_total", handler="/v1/completions", status="400", method="POST") == 1
    assert delta("lanner_http_requests_total", handler="/v1/chat/completions", status="200") == 1


def test_unknown_paths_do_not_create_series(http):
    for i in range(3):
        http.get(f"/no/such/path/{i}")
    samples = scrape(http)
    handlers = {dict(lbl)["handler"] for (n, lbl) in samples if n == "lanner_http_requests_total"}
    assert "other" in handlers and not any(h.startswith("/no/") for h in handlers)
