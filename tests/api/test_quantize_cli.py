"""`lanner quantize` then `lanner serve --model DIR`: a pre-quantized checkpoint served over HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from app.cli import main
from tests.api.conftest import start_server, stop_server
from tests.api.test_cli import run_cli


def test_quantize_then_serve(tmp_path, demo_models_dir):
    out = tmp_path / "demo-llama-int4"
    r = run_cli("quantize", str(demo_models_dir / "demo-llama"), "--bits", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "quantize int4" in r.stderr and "3/3" in r.stderr  # the progress bar: head part + 2 layers
    assert f"wrote int4 checkpoint to {out}" in r.stderr
    manifest = json.loads((out / "lanner_quant.json").read_text())
    assert manifest["mode"] == "int4" and manifest["source"]["name"] == str(demo_models_dir / "demo-llama")

    args = ["--model", str(out), "--cache-dir", str(tmp_path / "cache")]
    proc, base = start_server(args, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["demo-llama-int4"]
        completion = client.completions.create(model="demo-llama-int4", prompt="Once upon a time",
                                               max_tokens=8, temperature=0)
        assert completion.usage.completion_tokens > 0
        assert completion.choices[0].finish_reason in ("length", "stop")
        metrics = httpx.get(f"{base}/metrics", timeout=30).text  # a quantized model keeps K/V in bf16
        info = [line for line in metrics.splitlines()
                if line.startswith("lanner_model_info{") and 'model_name="demo-llama-int4"' in line]
        assert len(info) == 1 and 'kv_cache_dtype="bfloat16"' in info[0], info
    finally:
        code = stop_server(proc)
    log = (tmp_path / "server.log").read_text()
    assert code == 0, log
    # runner: auto serves a pre-quantized checkpoint on the torch-free runner (app/lite)
    assert "torch-free runner, int4 weights" in log and "KV cache bf16" in log


def test_quantize_errors_are_clear(tmp_path, demo_models_dir, capsys):
    r = run_cli("quantize", str(tmp_path / "nope"), "--bits", "8", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(SystemExit) as exc:  # refused before anything is imported or read: in process
        main(["quantize", str(demo_models_dir / "demo-llama"), "--bits", "8", "--group-size", "32",
              "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--group-size applies to --bits 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
