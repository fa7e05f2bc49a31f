"""configs/prometheus.yml and the Grafana dashboard, proven on a real Prometheus scraping a real Lanner.

- `promtool check config` accepts configs/prometheus.yml (and the test's copy of it);
- the dashboard JSON is well formed: unique panel ids, the provisioned datasource on every panel and
  query, the `model_name` / `instance` variables, every metric of docs/metrics.md on some panel, and every
  selector filtered by `$model_name` / `$instance` where the metric has those labels;
- a `lanner serve` process (the demo models, an API key) gets real traffic through the openai client —
  completions and chat, streamed and not, finished by `stop` and `length`, two streams the client walks
  away from, two 400s for a known model — while Prometheus scrapes it every second with a copy of
  configs/prometheus.yml that points at it (and sends the key, as docs/metrics.md describes). Then every
  `expr` of the dashboard, and every variable query, evaluated through Prometheus' HTTP API with the
  variables substituted as Grafana would, must succeed and return data — once with every model and
  instance selected, once with a single model and instance, which must then be the only ones returned.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.api.conftest import free_port, start_server, stop_server
from tests.deploy.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
PROM_CONFIG = ROOT / "configs" / "prometheus.yml"
DASHBOARD = ROOT / "configs" / "grafana" / "dashboards" / "lanner.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
API_KEY = "dashboard-key-123"
MODELS = ("demo-llama", "demo-falcon")
# what Grafana would put in for its built-in variables (the test scrapes every second)
BUILTINS = {"__rate_interval": "2m", "__interval": "15s", "__range": "5m", "__range_s": "300",
            "__interval_ms": "15000"}
DEADLINE_S = 60.0


# --------------------------------------------------------------------------------------------- dashboard

def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])


def variable_query(var: dict[str, Any]) -> str:
    q = var.get("query")
    return q.get("query", "") if isinstance(q, dict) else (q or "")


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values(sel, label) -> sel)."""
    out = []
    for p in all_panels(dash["panels"]):
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append((f"panel {p['id']} {p.get('title')!r} ref {t.get('refId')}", t["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            out.append((f"variable {var['name']}", variable_query(var)))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<sel>.+),\s*(?P<label>\w+)\s*\)\s*$", re.S)


def to_promql(query: str, variables: dict[str, str]) -> tuple[str, str | None]:
    """Substitute variables ($x, ${x}, [[x]]); a label_values() variable query becomes its selector.

    Returns (expr, label): `label` is set for label_values() queries, whose results must carry it.
    """
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in variables, f"unknown variable ${name} in {query!r}"
        return variables[name]

    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", sub, query)
    m = _LABEL_VALUES.match(expr)
    return (m["sel"], m["label"]) if m else (expr, None)


def documented_metrics() -> dict[str, str]:
    """name -> type for every metric row of docs/metrics.md."""
    out = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"^\| `(lanner_[a-z_]+)` \|(.*)$", line)
        if m:
            cells = [c.strip() for c in m[2].split("|")]
            out[m[1]] = "histogram" if "histogram" in cells[:2] else cells[0]
    assert len(out) >= 25, out
    return out


def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    problems = []
    for p in panels:
        where = f"panel {p.get('id')} {p.get('title')!r}"
        if not p.get("title") or "gridPos" not in p:
            problems.append(f"{where}: no title or gridPos")
        if p["type"] == "row":
            continue
        if p["type"] not in ("timeseries", "stat", "table", "bargauge", "gauge", "text", "heatmap"):
            problems.append(f"{where}: unexpected panel type {p['type']}")
        if p.get("datasource") != DATASOURCE:
            problems.append(f"{where}: datasource {p.get('datasource')}")
        if not p.get("targets"):
            problems.append(f"{where}: no queries")
        for t in p.get("targets") or []:
            if t.get("datasource") != DATASOURCE or not t.get("expr") or not t.get("refId"):
                problems.append(f"{where}: target {t}")
        refs = [t.get("refId") for t in p.get("targets") or []]
        if len(refs) != len(set(refs)):
            problems.append(f"{where}: duplicate refIds {refs}")
    assert not problems, "\n".join(problems)

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    model = variables.get("model_name")
    assert model, f"no model_name variable: {list(variables)}"
    assert model["type"] == "query" and model["datasource"] == DATASOURCE
    assert re.fullmatch(r"label_values\(\s*lanner_model_info\s*,\s*model_name\s*\)", variable_query(model))
    assert model["multi"] and model["includeAll"]
    inst = variables.get("instance")
    assert inst and inst["type"] == "query" and inst["datasource"] == DATASOURCE
    assert variable_query(inst).startswith("label_values(") and variable_query(inst).endswith(", instance)")
    assert inst["multi"] and inst["includeAll"]

    # every documented metric is on the dashboard (histograms as quantiles over their buckets) ...
    exprs = [e for _, e in dashboard_queries(dash)]
    text = "\n".join(exprs)
    missing = []
    for name, kind in documented_metrics().items():
        pattern = rf"\b{name}_bucket\{{" if kind == "histogram" else rf"\b{name}(_total)?\{{"
        if not re.search(pattern, text):
            missing.append(f"{name} ({kind})")
    if not re.search(r"\bprocess_\w+\{", text):
        missing.append("process_*")
    assert not missing, f"documented metrics not on the dashboard: {missing}"

    # ... and every selector is filtered by the variables its metric has labels for
    unfiltered = []
    for where, expr in dashboard_queries(dash):
        if where.startswith("variable"):
            continue
        for m in re.finditer(r"\b(lanner_\w+|process_\w+|up)\b(\{[^}]*\})?", expr):
            name, sel = m[1], m[2] or ""
            need = ['instance=~"$instance"']
            if name.startswith("lanner_") and not name.startswith("lanner_http_"):
                need.append('model_name=~"$model_name"')
            if not all(n in sel for n in need):
                unfiltered.append(f"{where}: {name}{sel} lacks {need}")
    assert not unfiltered, "\n".join(unfiltered)


# -------------------------------------------------------------------------------------- prometheus config

def test_prometheus_config_is_valid():
    promtool = require_tool("promtool")
    r = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = [t for j in jobs.values() for sc in j.get("static_configs", []) for t in sc["targets"]]
    assert "lanner:8000" in targets and {"lanner-1:8000", "lanner-2:8000"} <= set(targets), targets


def scrape_config_for(target: str, interval: str = "1s") -> dict[str, Any]:
    """The repo's config with its `lanner` job pointed at `target` (with our API key), scraping every
    `interval`; the replica job, whose hosts only exist in docker-compose, is left out."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "lanner")
    job["static_configs"] = [{"targets": [target]}]
    job["authorization"] = {"type": "Bearer", "credentials": API_KEY}
    cfg["scrape_configs"] = [job]
    return cfg


# ------------------------------------------------------------------------------------------ the real stack

@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log_path: Path
    http: httpx.Client

    def query(self, expr: str) -> dict[str, Any]:
        r = self.http.get(f"{self.url}/api/v1/query", params={"query": expr})
        try:
            return r.json()
        except ValueError:
            return {"status": "error", "error": f"HTTP {r.status_code}: {r.text[:300]}"}

    def scalar(self, expr: str) -> float:
        res = self.query(expr)
        result = res.get("data", {}).get("result") or []
        return float(result[0]["value"][1]) if res.get("status") == "success" and result else float("nan")

    def diagnostics(self) -> str:
        try:
            targets = self.http.get(f"{self.url}/api/v1/targets").json()["data"]["activeTargets"]
            t = "\n".join(f"  {x['scrapeUrl']} health={x['health']} lastError={x['lastError']!r}"
                          for x in targets)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            t = f"  (no target list: {exc})"
        log = self.log_path.read_text(errors="replace")[-3000:]
        return f"Prometheus targets:\n{t}\nPrometheus log (tail):\n{log}"


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Call `check` until it returns True or `timeout` seconds pass (polling, not waiting on time)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    return {name: require_tool(name) for name in ("prometheus", "promtool")}


@pytest.fixture(scope="module")
def lanner(tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
           demo_models_dir: Path) -> Iterator[str]:
    """A real `lanner serve` with both demo models (built once per session) and an API key.

    `tools` comes first: a missing Prometheus skips before the demo models are built."""
    root = tmp_path_factory.mktemp("dashboard-lanner")
    cfg = root / "models.yaml"
    cfg.write_text("models:\n" + "".join(
        f"  - {{id: {m}, source: {demo_models_dir / m}, max_num_seqs: 4}}\n" for m in MODELS))
    args = ["--config", str(cfg), "--cache-dir", str(root / "cache"), "--api-key", API_KEY]
    proc, base = start_server(args, root / "server.log")
    try:
        yield base
    finally:
        assert stop_server(proc) == 0, (root / "server.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def prometheus(tools: dict[str, str], lanner: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary, promtool = tools["prometheus"], tools["promtool"]
    root = tmp_path_factory.mktemp("dashboard-prometheus")
    config = root / "prometheus.yml"
    target = lanner.removeprefix("http://")
    config.write_text(yaml.safe_dump(scrape_config_for(target), sort_keys=False))
    r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    port = free_port()
    log_path = root / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(timeout=10)
    prom = Prometheus(url, proc, log_path, http)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}:\n{log_path.read_text()}"
            try:
                return http.get(f"{url}/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        assert poll(ready, 30), f"prometheus not ready:\n{log_path.read_text()}"
        # the first scrape succeeded, with the API key (a 401 would leave up == 0)
        assert poll(lambda: prom.scalar(f'up{{job="lanner", instance="{target}"}}') == 1, 30), \
            prom.diagnostics()
        yield prom
    finally:
        http.close()
        stop_process(proc)


def drive_traffic(base_url: str) -> dict[str, int]:
    """Real requests through the official client; returns how many ended which way."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    counts = {"length": 0, "stop": 0, "abort": 0, "invalid": 0}

    def completion(model: str) -> str:
        return client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                                         temperature=0).choices[0].finish_reason

    def chat(model: str) -> str:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}],
                                              max_tokens=6, extra_body={"ignore_eos": True}
                                              ).choices[0].finish_reason

    def stream_completion(model: str) -> str:
        chunks = list(client.completions.create(model=model, prompt="Tell me a story", max_tokens=12,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        return next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)

    def stream_chat(model: str) -> str:
        chunks = list(client.chat.completions.create(model=model, max_tokens=10, stream=True,
                                                     messages=[{"role": "user", "content": "Count to ten"}],
                                                     extra_body={"ignore_eos": True}))
        return next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)

    jobs = [(fn, m) for m in MODELS for fn in (completion, chat, stream_completion, stream_chat)] * 2
    with ThreadPoolExecutor(4) as pool:  # a few at once, so steps batch several sequences
        reasons = list(pool.map(lambda job: job[0](job[1]), jobs))
    assert set(reasons) == {"length"}, reasons
    counts["length"] += len(reasons)

    # finished by a stop string: stop on a piece of the (deterministic, greedy) text itself
    text = client.completions.create(model=MODELS[0], prompt="Once upon a time", max_tokens=8,
                                     temperature=0).choices[0].text
    counts["length"] += 1
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), repr(text)
    choice = client.completions.create(model=MODELS[0], prompt="Once upon a time", max_tokens=8,
                                       temperature=0, stop=[stop]).choices[0]
    assert choice.finish_reason == "stop", (text, stop, choice)
    counts["stop"] += 1

    # streams the client walks away from after the first chunk: the engine aborts them
    for model in MODELS:
        stream = client.completions.create(model=model, prompt="Go on and on", max_tokens=1000, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()
        counts["abort"] += 1

    # 400s for a known model count as failures (reason invalid_request)
    for model in MODELS:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="x", max_tokens=10**6)
        counts["invalid"] += 1
    return counts


def check_query(prom: Prometheus, query: str, variables: dict[str, str],
                only: dict[str, str] | None = None) -> str | None:
    """None if the query succeeds with data, else the problem: an error, an empty result, no finite value,
    or (with `only`) a series whose label differs from the single selected value."""
    expr, label = to_promql(query, {**BUILTINS, **variables})
    res = prom.query(expr)
    if res.get("status") != "success":
        return f"{res.get('errorType')}: {res.get('error')}\n      {expr}"
    data = res["data"]
    result = data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]
    if not result:
        return f"empty result\n      {expr}"
    if label is not None:
        if not all(label in s.get("metric", {}) for s in result):
            return f"some series lack label {label!r}: {result}\n      {expr}"
        return None
    values = [float(s["value"][1]) for s in result]
    if not any(math.isfinite(v) for v in values):
        return f"no finite value ({values})\n      {expr}"
    for key, want in (only or {}).items():
        got = {s["metric"][key] for s in result if key in s.get("metric", {})}
        if got - {want}:
            return f"{key} filter not applied: {sorted(got)}\n      {expr}"
    return None


def test_every_dashboard_query_returns_data(lanner: str, prometheus: Prometheus):
    prom = prometheus
    counts = drive_traffic(lanner)

    # Prometheus has scraped the end state of the traffic (aborts are counted once the engine notices)
    expect = {
        'sum(lanner_requests_finished_total{finished_reason="length"})': counts["length"],
        'sum(lanner_requests_finished_total{finished_reason="stop"})': counts["stop"],
        'sum(lanner_requests_finished_total{finished_reason="abort"})': counts["abort"],
        'sum(lanner_requests_failed_total{reason="invalid_request"})': counts["invalid"],
    }
    seen: dict[str, float] = {}

    def scraped() -> bool:
        seen.update({e: prom.scalar(e) for e in expect})
        return all(seen[e] >= n for e, n in expect.items())

    assert poll(scraped, DEADLINE_S), \
        f"traffic not seen by Prometheus: {seen} (want {expect})\n{prom.diagnostics()}"

    dash = load_dashboard()
    queries = dashboard_queries(dash)
    assert len(queries) >= 40, len(queries)
    target = lanner.removeprefix("http://")
    passes = {
        # "All" (model_name's allValue is .*; for instance, .* matches whatever alternation Grafana builds)
        "all": ({"model_name": ".*", "instance": ".*"}, None),
        # one model and one instance selected: Grafana regex-escapes the value inside the PromQL string
        "one": ({"model_name": MODELS[1], "instance": re.escape(target).replace("\\", "\\\\")},
                {"model_name": MODELS[1], "instance": target}),
    }
    # rate() needs two scrapes after the traffic: poll until every query has had data (with each set of
    # variables) or the deadline; only the queries that never had any are reported
    pending = {(p, where): query for p in passes for where, query in queries}
    problems: dict[tuple[str, str], str] = {}

    def all_had_data() -> bool:
        for key, query in list(pending.items()):
            variables, only = passes[key[0]]
            problem = check_query(prom, query, variables, only)
            if problem is None:
                del pending[key]
                problems.pop(key, None)
            else:
                problems[key] = problem
        return not pending

    poll(all_had_data, DEADLINE_S, interval=0.5)
    assert not problems, (
        f"{len(problems)} of {len(passes) * len(queries)} dashboard queries never returned data "
        f"(variables: {passes}):\n"
        + "\n".join(f"  [{p}] {w}: {msg}" for (p, w), msg in problems.items()) + "\n" + prom.diagnostics())
