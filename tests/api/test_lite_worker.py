"""`runner: lite` through a real server and the openai client: a pre-quantized checkpoint served by a worker
that never loads torch (what `runner: auto`, the default, picks for it), beside the same checkpoint on the torch
runner, and the unquantized model with `quantize: int8`, quantized once into the server's cache and served from
there by a lite worker too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

from app.models.loader import inspect_model_dir
from app.quant.checkpoint import quantize_checkpoint
from tests.api.conftest import start_server, stop_server
from tests.api.test_workers import mapped_libraries, worker_of


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_models_dir):
    root = tmp_path_factory.mktemp("lite-server")
    ckpt = root / "demo-llama-int8"
    quantize_checkpoint(inspect_model_dir(demo_models_dir / "demo-llama"), ckpt, "int8")
    cfg = root / "models.yaml"
    cfg.write_text("models:\n"
                   f"  - {{id: lite, source: {ckpt}, max_num_seqs: 4}}\n"  # runner: auto picks lite
                   f"  - {{id: torch, source: {ckpt}, runner: batched, max_num_seqs: 4}}\n"
                   f"  - {{id: cached, source: {demo_models_dir / 'demo-llama'}, quantize: int8, max_num_seqs: 4}}\n")
    proc, base = start_server(["--config", str(cfg), "--cache-dir", str(root / "cache")], root / "server.log")
    yield proc, openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    assert stop_server(proc) == 0


def test_lite_worker_holds_no_torch(served):
    proc, _ = served
    libs = mapped_libraries(worker_of(proc.pid, "lite"))
    assert "libtorch_cpu.so" not in libs and any(name.startswith("lanner_lite") for name in libs)
    assert "libtorch_cpu.so" in mapped_libraries(worker_of(proc.pid, "torch"))


def test_lite_greedy_text_equals_the_torch_runner(served):
    _, client = served
    prompt = "The llama climbed the hill and"
    texts = {m: client.completions.create(model=m, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
             for m in ("lite", "torch", "cached")}
    assert texts["lite"] == texts["torch"] == texts["cached"] and len(texts["lite"]) > 0


def test_quantize_at_load_is_served_from_the_cache_without_torch(served, demo_models_dir):
    proc, _ = served
    libs = mapped_libraries(worker_of(proc.pid, "cached"))
    assert "libtorch_cpu.so" not in libs and any(name.startswith("lanner_lite") for name in libs)
    cache = Path(proc.args[proc.args.index("--cache-dir") + 1])
    [made] = (cache / "quantized").glob("demo-llama-int8-*")
    manifest = json.loads((made / "lanner_quant.json").read_text())
    assert manifest["mode"] == "int8" and manifest["source"]["path"] == str((demo_models_dir / "demo-llama").resolve())
    log = (cache.parent / "server.log").read_text()
    assert f"quantizing {(demo_models_dir / 'demo-llama').resolve()} to int8 once, into the cache ({made})" in log


def test_lite_serves_sampling_logprobs_and_json(served):
    _, client = served
    chat = client.chat.completions.create(model="lite", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          logprobs=True, top_logprobs=3, temperature=0.9, seed=7, n=2)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in chat.choices)
    for c in chat.choices:
        for lp in c.logprobs.content:
            assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
    again = client.chat.completions.create(model="lite", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           temperature=0.9, seed=7, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    echo = client.completions.create(model="lite", prompt="once upon a", max_tokens=2, echo=True, logprobs=1)
    assert echo.choices[0].text.startswith("once upon a") and echo.choices[0].logprobs.token_logprobs[0] is None
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    doc = client.chat.completions.create(
        model="lite", messages=[{"role": "user", "content": "a number"}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    value = json.loads(doc.choices[0].message.content)
    assert set(value) == {"n"} and 0 <= value["n"] <= 99


async def test_lite_outputs_do_not_depend_on_the_batch(served):
    """Every op of the lite runner computes a row alone (the kernels are bit-identical alone or in a batch,
    attention reads each row's own slot), so greedy outputs of concurrent requests, some sharing a long prefix
    (prefix copies between slots), equal the same requests sent one at a time."""
    import asyncio

    proc, client = served
    base = str(client.base_url)
    aclient = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
    shared = "The llama climbed the hill to watch the birds fly over the valley far below, " * 3
    prompts = [shared + tail for tail in ("and then", "so she", "but the", "while a")] + \
        ["Once upon a time", "A short poem:", "Numbers: 1, 2,", "Hello"]

    async def one(prompt: str) -> str:
        done = await aclient.completions.create(model="lite", prompt=prompt, max_tokens=12, temperature=0)
        return done.choices[0].text

    together = await asyncio.gather(*(one(p) for p in prompts))
    alone = [await one(p) for p in prompts]
    assert together == alone and all(together)


def test_stopping_while_quantizing_into_the_cache_ends_the_worker(tmp_path, demo_models_dir):
    """SIGTERM while a worker waits to quantize (here: for the lock, held by this test as another replica
    would) stops the server at once, the worker with it, and leaves no checkpoint behind; the next start
    quantizes and serves."""
    import fcntl
    import os
    import signal
    import subprocess

    from app.quant.cache import cached_checkpoint_dir

    source = demo_models_dir / "demo-llama"
    out = cached_checkpoint_dir(tmp_path / "cache" / "quantized", source, "int8", None, "int8")
    out.parent.mkdir(parents=True)
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "app", "serve", "--port", "0", "--model", str(source), "--quantize", "int8",
           "--cache-dir", str(tmp_path / "cache")]
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_line(log, "waiting for another process quantizing into", proc)
            worker = worker_of(proc.pid, "demo-llama")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert not Path(f"/proc/{worker}").exists() and not out.exists()
        assert "Traceback" not in log.read_text()
    again, base = start_server(["--model", str(source), "--quantize", "int8", "--cache-dir", str(tmp_path / "cache")],
                               tmp_path / "again.log")
    try:
        assert "libtorch_cpu.so" not in mapped_libraries(worker_of(again.pid, "demo-llama")) and out.is_dir()
    finally:
        assert stop_server(again) == 0


def wait_for_line(log: Path, text: str, proc, timeout: float = 60.0) -> None:
    """Until `text` is in the log (polling the file; a process that dies first fails the test)."""
    import time

    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)  # polling a log file for a line, not synchronising on time
