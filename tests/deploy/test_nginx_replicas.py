"""configs/nginx/nginx.conf in front of two real `lanner serve` replicas, with Debian's nginx.

Like the compose profile "replicas": two replicas share one cache dir (the demo models are built once,
under a lock) and are configured by environment (LANNER_CACHE_DIR, LANNER_API_KEY); nginx runs a copy of
the repo's config with the substitutions documented at its top. Then:
- 100 streaming completions through nginx with the official async openai client (16 at a time): no
  errors, every stream has text and a finish_reason, and both replicas served requests (nginx's access
  log and each replica's /metrics agree);
- SSE is not buffered by the proxy: the first token of an 800-token stream arrives long before its end,
  the events arrive one or two per read rather than in buffer-sized bursts, and the response has no
  Content-Length;
- the Authorization header reaches the replicas, /nginx-health answers, bodies over 2 MB are refused;
- the health-check commands of the Dockerfile and docker-compose.yml pass against a replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api.conftest import free_port, start_server, stop_server
from tests.deploy.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "configs" / "nginx" / "nginx.conf"
API_KEY = "replica-key-123"
MODEL = "demo-llama"
N_REQUESTS = 100
CONCURRENCY = 16
SSE_TOKENS = 800


@dataclass
class Replica:
    name: str
    base_url: str
    port: int
    proc: subprocess.Popen
    log_path: Path


@dataclass
class Nginx:
    base_url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    root = tmp_path_factory.mktemp("replicas")
    env = {"LANNER_CACHE_DIR": str(root / "cache"), "LANNER_API_KEY": API_KEY}
    started: list[Replica] = []

    def start(name: str) -> Replica:
        log = root / f"{name}.log"
        proc, base = start_server([], log, env=env)
        return Replica(name, base, int(base.rsplit(":", 1)[1]), proc, log)

    # Both at once, as compose starts them: the second waits on the demo-model build lock.
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, name) for name in ("lanner-1", "lanner-2")]
        errors = []
        for f in futures:
            try:
                started.append(f.result())
            except Exception as exc:  # start_server stops a server that never got ready
                errors.append(exc)
    try:
        if errors:
            raise errors[0]
        yield started
    finally:
        codes = {r.name: stop_server(r.proc) for r in started}
    assert all(c == 0 for c in codes.values()), codes


def nginx_conf_for(text: str, upstream_ports: list[int], listen_port: int, tmp: Path) -> str:
    """The substitutions documented at the top of configs/nginx/nginx.conf; each must match."""
    subs = [(f"server lanner-{i}:8000", f"server 127.0.0.1:{p}") for i, p in enumerate(upstream_ports, 1)]
    subs += [("listen 8080", f"listen 127.0.0.1:{listen_port}"),
             ("/var/cache/nginx/", f"{tmp}/"),
             ("/var/run/nginx.pid", f"{tmp}/nginx.pid")]
    for old, new in subs:
        assert old in text, f"{NGINX_CONF} no longer contains {old!r} (see its header)"
        text = text.replace(old, new)
    assert not re.search(r"^[ \t]*server[ \t]+(?![{]|127\.0\.0\.1:)", re.sub(r"#.*", "", text), flags=re.M), \
        "an upstream server was not substituted"
    return text


@pytest.fixture(scope="module")
def nginx(replicas: list[Replica]) -> Iterator[Nginx]:
    binary = require_tool("nginx")
    # Not under pytest's 0700 tmp dirs: run as root, nginx's workers drop to an unprivileged user
    # (no `user` directive: the build's default, nobody) and must reach the temp dirs.
    tmp = Path(tempfile.mkdtemp(prefix="lanner-nginx-"))
    proc: subprocess.Popen | None = None
    log_path = tmp / "nginx.log"
    try:
        tmp.chmod(0o755)
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf_for(NGINX_CONF.read_text(), [r.port for r in replicas], port, tmp))
        base = f"http://127.0.0.1:{port}"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log"),
                                     "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        server = Nginx(base, proc, log_path)
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=2) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"nginx exited with {proc.returncode}:\n{server.log()}")
                try:
                    if c.get(f"{base}/nginx-health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx not answering after 30 s:\n{server.log()}")
                time.sleep(0.1)  # polling nginx's health location, not synchronising on time
        yield server
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: fast shutdown
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_path.exists():  # kept with the replica logs
            shutil.copy(log_path, replicas[0].log_path.parent / "nginx.log")
        shutil.rmtree(tmp, ignore_errors=True)


def finished_requests(replica: Replica) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{replica.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    return sum(s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
               if s.name == "lanner_requests_finished_total" and s.labels.get("model_name") == MODEL)


def upstream_counts(log: str, path: str) -> Counter:
    line = rf'"POST {re.escape(path)} HTTP/1\.1" 200 \d+ upstream=(\S+)'
    return Counter(m.group(1) for m in re.finditer(line, log))


async def test_100_streams_through_nginx_reach_both_replicas(nginx: Nginx, replicas: list[Replica]):
    import openai

    before = {r.name: finished_requests(r) for r in replicas}
    log_before = upstream_counts(nginx.log(), "/v1/completions")
    client = openai.AsyncOpenAI(base_url=f"{nginx.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    sem = asyncio.Semaphore(CONCURRENCY)
    errors: list[str] = []
    results: list[tuple[str, str | None, int]] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                stream = await client.completions.create(
                    model=MODEL, prompt=f"request {i}: once upon a time", max_tokens=8, temperature=0,
                    stream=True, extra_body={"ignore_eos": True})
                text, finish, chunks = "", None, 0
                async for chunk in stream:
                    chunks += 1
                    for choice in chunk.choices:
                        text += choice.text or ""
                        finish = choice.finish_reason or finish
                results.append((text, finish, chunks))
            except Exception as exc:
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(N_REQUESTS))), timeout=240)
    finally:
        await client.close()
    elapsed = time.monotonic() - t0

    assert not errors, f"{len(errors)} errors, first: {errors[:3]}\n{nginx.log()[-3000:]}"
    assert len(results) == N_REQUESTS
    assert all(text for text, _, _ in results), "a stream without text"
    assert all(finish == "length" for _, finish, _ in results), Counter(f for _, f, _ in results)

    # nginx's view: which upstream served each POST.  nginx writes a request's access-log line after the
    # response is done, which can be just after the client has read the last byte: poll briefly.
    deadline = time.monotonic() + 15
    while True:
        by_upstream = upstream_counts(nginx.log(), "/v1/completions") - log_before
        if sum(by_upstream.values()) >= N_REQUESTS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)  # polling the log, not synchronising on time
    ports = {f"127.0.0.1:{r.port}": r.name for r in replicas}
    assert set(by_upstream) <= set(ports), by_upstream
    served = {ports[addr]: n for addr, n in by_upstream.items()}
    assert sum(served.values()) == N_REQUESTS, served
    # the replicas' view: lanner_requests_finished_total (recorded as the engine's step stats arrive,
    # so poll briefly until all 100 are counted)
    deadline = time.monotonic() + 15
    while True:
        finished = {r.name: finished_requests(r) - before[r.name] for r in replicas}
        if sum(finished.values()) >= N_REQUESTS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)  # polling the counters, not synchronising on time
    print(f"\n{N_REQUESTS} streams in {elapsed:.1f}s; nginx upstreams: {served}; "
          f"replicas' metrics: {finished}")
    assert finished == served, (finished, served)
    assert all(served.get(r.name, 0) > 0 for r in replicas), f"one replica got everything: {served}"


async def test_sse_is_not_buffered_by_nginx(nginx: Nginx):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": SSE_TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True}
    reads: list[tuple[float, bytes]] = []
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        t0 = time.monotonic()
        async with c.stream("POST", f"{nginx.base_url}/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            headers = r.headers
            async for raw in r.aiter_raw():
                reads.append((time.monotonic() - t0, raw))
    assert headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in headers, headers
    assert headers.get("transfer-encoding") == "chunked", headers

    # arrival time of every SSE event: the read that completed it
    events: list[tuple[float, str]] = []
    buf = ""
    for t, raw in reads:
        buf += raw.decode()
        *complete, buf = buf.split("\n\n")
        events += [(t, e[len("data: "):]) for e in complete if e.startswith("data: ")]
    assert events and events[-1][1] == "[DONE]" and not buf.strip(), (events[-3:], buf[-500:])
    chunks = [(t, json.loads(e)) for t, e in events[:-1]]
    assert chunks[-1][1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    assert "".join(c["choices"][0]["text"] for _, c in chunks), "no text"
    first_token = next(t for t, c in chunks if c["choices"][0]["text"])
    total = events[-1][0]
    print(f"\n{len(chunks)} SSE chunks in {len(reads)} reads; first token after {first_token * 1000:.0f} ms, "
          f"[DONE] after {total * 1000:.0f} ms")
    # Unbuffered, the first token arrives while the rest is still being generated ...
    assert first_token < 0.5 * total, f"first token after {first_token:.3f}s of {total:.3f}s: buffered?"
    # ... and the events trickle in one or two per read. When tokens come fast, a buffering proxy
    # forwards them in 4-8 KB bursts (~20 events per read), though it too sends the first piece early,
    # with the headers; when they come slowly it forwards them as they arrive even with buffering on,
    # so test_nginx_conf_streams_unbuffered checks the directives themselves too.
    assert len(reads) >= 0.25 * len(events), f"{len(events)} events in only {len(reads)} reads: buffered?"


def test_nginx_conf_streams_unbuffered():
    """The directives that make SSE safe, in the location that proxies to the replicas."""
    conf = re.sub(r"#.*", "", NGINX_CONF.read_text())
    upstream = re.search(r"upstream lanner \{(.*?)\}", conf, flags=re.S).group(1)
    assert re.search(r"^\s*least_conn;", upstream, flags=re.M)
    assert re.search(r"^\s*keepalive \d+;", upstream, flags=re.M)
    location = re.search(r"location / \{(.*?)\}", conf, flags=re.S).group(1)
    directives = dict(re.findall(r"^\s*(\w+)\s+(.*?);", location, flags=re.M))
    assert directives["proxy_pass"] == "http://lanner"
    assert directives["proxy_http_version"] == "1.1" and directives["proxy_set_header"]  # keep-alive upstream
    assert re.search(r'proxy_set_header Connection "";', location)
    assert re.search(r"proxy_set_header Authorization \$http_authorization;", location)
    assert directives["proxy_buffering"] == "off" and directives["proxy_cache"] == "off"
    assert directives.get("gzip", "off") == "off"
    assert int(directives["proxy_read_timeout"].rstrip("s")) >= 600
    assert re.search(r"client_max_body_size 2m;", conf) and re.search(r"location = /nginx-health", conf)


def test_proxy_forwards_auth_and_limits_bodies(nginx: Nginx):
    with httpx.Client(base_url=nginx.base_url, timeout=30) as c:
        assert c.get("/nginx-health").text == "ok\n"
        # the replica answers 401 itself without a key, and serves with the forwarded key
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and MODEL in {m["id"] for m in r.json()["data"]}
        # client_max_body_size 2m: nginx refuses a bigger body before it reaches a replica
        big = json.dumps({"model": MODEL, "prompt": "x" * (2 * 1024 * 1024 + 1)})
        r = c.post("/v1/completions", content=big, headers={"Authorization": f"Bearer {API_KEY}",
                                                            "Content-Type": "application/json"})
        assert r.status_code == 413


def _healthcheck_argv(cmd: list[str]) -> list[str]:
    """Map the image's health check command to this checkout: python + the script it copies."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    copies = {dest: src for src, dest in re.findall(r"^COPY\s+(\S+)\s+(\S+)\s*$", dockerfile, flags=re.M)}
    assert cmd[0] == "python" and cmd[1] in copies, (cmd, copies)
    return [sys.executable, str(ROOT / copies[cmd[1]]), *cmd[2:]]


def test_image_healthchecks_pass_against_a_replica(replicas: list[Replica]):
    dockerfile = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*?\])\s*$", dockerfile.replace("\\\n", " "), flags=re.M)
    assert m, "no exec-form HEALTHCHECK in the Dockerfile"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_test = compose["services"]["lanner"]["healthcheck"]["test"]
    assert compose_test[0] == "CMD"
    env = {**os.environ, "LANNER_HOST": "0.0.0.0", "LANNER_PORT": str(replicas[0].port),
           "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}  # must be ignored
    for cmd in (json.loads(m.group(1)), compose_test[1:]):
        argv = _healthcheck_argv(cmd)
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (shlex.join(cmd), r.stderr)
        r = subprocess.run(argv, env={**env, "LANNER_PORT": str(free_port())}, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1 and "lanner-healthcheck" in r.stderr, (shlex.join(cmd), r.stderr)
