"""The command line: `lanner serve` with one model, clear start-up errors, settings precedence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai

from tests.api.conftest import start_server, stop_server


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_missing_model_dir_is_a_clear_error(tmp_path):
    r = run_cli("serve", "--model", str(tmp_path / "nope"), "--port", "0")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_unknown_architecture_is_a_clear_error(tmp_path):
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = run_cli("serve", "--model", str(d), "--port", "0")
    assert r.returncode == 2
    assert "gpt2" in r.stderr and "llama" in r.stderr and "Traceback" not in r.stderr


def test_source_outside_model_roots_is_refused(tmp_path, demo_models_dir):
    r = run_cli("serve", "--model", str(demo_models_dir / "demo-llama"), "--port", "0",
                env={"LANNER_MODEL_ROOTS": str(tmp_path)})
    assert r.returncode == 2 and "allowed model roots" in r.stderr


def test_hub_id_offline_is_a_clear_error(tmp_path):
    r = run_cli("serve", "--model", "some-org/some-model", "--port", "0", "--cache-dir", str(tmp_path),
                env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "some-org/some-model" in r.stderr and "Traceback" not in r.stderr


def test_invalid_config_file_is_a_clear_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  - {id: a}\n")  # no source
    r = run_cli("serve", "--config", str(cfg), "--port", "0")
    assert r.returncode == 2 and "source" in r.stderr


def test_make_demo_models(tmp_path):
    r = run_cli("make-demo-models", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for mid in ("demo-llama", "demo-falcon"):
        assert (tmp_path / mid / "model.safetensors").is_file()
        assert f"{mid}\t{tmp_path / mid}" in r.stdout


def test_single_model_serve_env_overrides_config(tmp_path, demo_models_dir):
    # YAML says api key "from-yaml" and max_num_seqs 2; env overrides the key; --model replaces the models
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"api_keys: [from-yaml]\nmodels:\n  - {{id: other, source: {demo_models_dir / 'demo-falcon'}}}\n")
    proc, base = start_server(["--config", str(cfg), "--model", str(demo_models_dir / "demo-llama"),
                               "--model-id", "mine", "--max-num-seqs", "2"],
                              tmp_path / "log.txt", env={"LANNER_API_KEY": "from-env"})
    try:
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer from-yaml"}).status_code == 401
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["mine"]
        assert c.completions.create(model="mine", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        assert stop_server(proc) == 0
