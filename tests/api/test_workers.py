"""Worker processes: one per model, pinned to its configured cores, never outliving the server; a dead
worker fails its own requests fast while the other model keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import start_server, stop_server

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to pin two models apart")


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def thread_affinities(pid: int) -> set[str]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out.add(line.split(":", 1)[1].strip())
    return out


def worker_of(pid: int, model_id: str) -> int:
    from app.engine.process import process_name

    for kid in children(pid):
        if Path(f"/proc/{kid}/comm").read_text().strip() == process_name(model_id):
            return kid
    raise AssertionError(f"no worker for {model_id} among {children(pid)}")


@pytest.fixture(scope="module")
def pinned(tmp_path_factory, demo_models_dir):
    root = tmp_path_factory.mktemp("pinned")
    cfg = root / "models.yaml"
    cfg.write_text(
        "models:\n"
        f"  - {{id: demo-llama, source: {demo_models_dir / 'demo-llama'}, cpus: '0', max_num_seqs: 16}}\n"
        f"  - {{id: demo-falcon, source: {demo_models_dir / 'demo-falcon'}, cpus: '1', max_num_seqs: 16}}\n")
    proc, base = start_server(["--config", str(cfg)], root / "server.log")
    yield proc, base
    if proc.poll() is None:
        stop_server(proc)


def workers(pid: int) -> list[int]:
    return [k for k in children(pid) if Path(f"/proc/{k}/comm").read_text().startswith("lw:")]


def test_each_worker_runs_only_on_its_cores(pinned):
    proc, base = pinned
    assert len(workers(proc.pid)) == 2, children(proc.pid)
    by_model = {m: worker_of(proc.pid, m) for m in ("demo-llama", "demo-falcon")}
    assert thread_affinities(by_model["demo-llama"]) == {"0"}
    assert thread_affinities(by_model["demo-falcon"]) == {"1"}
    # and both serve at the same time
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    for m in by_model:
        assert c.completions.create(model=m, prompt="hi", max_tokens=3).usage.completion_tokens == 3


def mapped_libraries(pid: int) -> set[str]:
    return {Path(line.split()[-1]).name for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if ".so" in line}


def test_the_api_process_never_loads_torch(pinned):
    """Configs are read in a child process and the tokenizers loaded without AutoTokenizer, so the process
    that serves HTTP holds no torch (~220 MiB), while it still renders chats and token logprobs."""
    proc, base = pinned
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    for m in ("demo-llama", "demo-falcon"):
        chat = c.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         logprobs=True, top_logprobs=2)
        assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens == 3
        done = c.completions.create(model=m, prompt="once upon", max_tokens=2, echo=True, logprobs=1)
        assert done.choices[0].text.startswith("once upon") and done.usage.prompt_tokens > 1
    assert "libtorch_cpu.so" not in mapped_libraries(proc.pid)
    assert all("libtorch_cpu.so" in mapped_libraries(w) for w in workers(proc.pid))


HEALTH_PROBER = """
import json, sys, threading, time, httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
lat = []
with httpx.Client() as c:
    while not stop.is_set():
        t0 = time.perf_counter()
        assert c.get(sys.argv[1]).status_code == 200
        lat.append(time.perf_counter() - t0)
        time.sleep(0.02)
print(json.dumps(lat))
"""


async def test_health_answers_while_engines_are_saturated(pinned):
    # The prober is its own process: in this one, the event loop is busy parsing 16 streams and would
    # measure its own delays rather than the server's.
    _, base = pinned
    prober = subprocess.Popen([sys.executable, "-c", HEALTH_PROBER, f"{base}/health"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)

    async def stream(i: int) -> int:
        s = await client.completions.create(model=("demo-llama", "demo-falcon")[i % 2], prompt=f"load {i}",
                                            max_tokens=900, stream=True, extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True})
        return [c.usage.completion_tokens async for c in s if c.usage][0]

    results = await asyncio.gather(*[stream(i) for i in range(16)])
    out, _ = prober.communicate("", timeout=30)
    latencies = json.loads(out)
    assert results == [900] * 16
    assert len(latencies) >= 5
    # a loose bound here (shared 2-core CI box); the benchmark reports the real p99 against 50 ms
    assert max(latencies) < 0.5, [round(x, 3) for x in latencies]


def test_dead_worker_fails_fast_and_the_other_model_serves(pinned):
    proc, base = pinned
    falcon = worker_of(proc.pid, "demo-falcon")
    os.kill(falcon, signal.SIGKILL)
    with httpx.Client(base_url=base, timeout=30) as h:
        deadline = time.monotonic() + 30
        while h.get("/ready").json()["models"]["demo-falcon"] != "failed":  # reader thread notices EOF
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = h.post("/v1/completions", json={"model": "demo-falcon", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert h.get("/ready").status_code == 503
        ok = h.post("/v1/completions", json={"model": "demo-llama", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_workers_do_not_outlive_the_server(pinned):
    proc, _ = pinned
    kids = children(proc.pid)  # the live worker, the resource tracker, the dead worker's zombie if any
    assert workers(proc.pid)
    assert stop_server(proc) == 0
    deadline = time.monotonic() + 15
    alive = kids
    while alive and time.monotonic() < deadline:  # exiting children are reparented and reaped by init
        alive = [k for k in alive if _alive(k)]
        time.sleep(0.05)
    assert not alive, [(k, _comm(k)) for k in alive]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
