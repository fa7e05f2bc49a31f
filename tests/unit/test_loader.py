"""Loader checks that need no real model: every failure is a clear ModelLoadError."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.models.loader import (
    ModelLoadError,
    inspect_model_dir,
    is_valid_hub_id,
    load_tokenizer,
    resolve_model_source,
)

LLAMA_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def make_model_dir(path: Path, config: dict | None = None, weights: str | None = "model.safetensors",
                   tokenizer: str | None = "tokenizer.json") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / weights).write_bytes(b"not really weights")
    if tokenizer:
        (path / tokenizer).write_text("{}")
    return path


def test_missing_local_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope"))


def test_local_file_is_not_a_dir(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_model_source(str(f))


def test_missing_config(tmp_path):
    d = make_model_dir(tmp_path / "m", config=None)
    with pytest.raises(ModelLoadError, match="missing config.json"):
        inspect_model_dir(d)


def test_unknown_model_type(tmp_path):
    d = make_model_dir(tmp_path / "m", config={"model_type": "gpt2"})
    with pytest.raises(ModelLoadError, match="gpt2") as err:
        inspect_model_dir(d)
    assert "llama" in str(err.value) and "falcon" in str(err.value)


def test_missing_safetensors(tmp_path):
    d = make_model_dir(tmp_path / "m", config=LLAMA_CONFIG, weights=None)
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        inspect_model_dir(d)


def test_bin_weights_are_refused(tmp_path):
    d = make_model_dir(tmp_path / "m", config=LLAMA_CONFIG, weights="pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no safetensors weights.*\.bin"):
        inspect_model_dir(d)


def test_missing_tokenizer(tmp_path):
    d = make_model_dir(tmp_path / "m", config=LLAMA_CONFIG, tokenizer=None)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        inspect_model_dir(d)


def test_broken_config_json(tmp_path):
    d = make_model_dir(tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        inspect_model_dir(d)


def test_inspect_fake_llama_eos_from_generation_config(tmp_path):
    d = make_model_dir(tmp_path / "m", config=LLAMA_CONFIG)
    info = inspect_model_dir(d)
    assert (info.arch, info.max_model_len, info.vocab_size) == ("llama", 512, 300)
    assert info.eos_token_ids == (2,) and info.bos_token_id == 1
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert inspect_model_dir(d).eos_token_ids == (2, 7)


@pytest.mark.parametrize("model_type,new_arch", [("RefinedWebModel", False), ("RefinedWeb", True)])
def test_legacy_falcon_configs(tmp_path, model_type, new_arch):
    config = {"model_type": model_type, "vocab_size": 500, "hidden_size": 64, "n_head": 4, "n_layer": 2,
              "multi_query": True, "parallel_attn": True, "bias": False,
              "bos_token_id": 11, "eos_token_id": 11}
    if new_arch:
        config["n_head_kv"] = 2
    info = inspect_model_dir(make_model_dir(tmp_path / "m", config=config))
    assert info.arch == "falcon" and info.config.model_type == "falcon"
    assert info.config.num_attention_heads == 4 and info.config.num_hidden_layers == 2
    assert info.config.new_decoder_architecture is new_arch
    assert info.config.num_kv_heads == (2 if new_arch else 1)  # falcon-7b layout: multi-query
    assert info.eos_token_ids == (11,)


def test_bad_tokenizer_file(tmp_path):
    d = make_model_dir(tmp_path / "m", config=LLAMA_CONFIG)
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(d)


def test_allowed_roots(tmp_path):
    root = tmp_path / "root"
    inside = make_model_dir(root / "m", config=LLAMA_CONFIG)
    outside = make_model_dir(tmp_path / "elsewhere", config=LLAMA_CONFIG)
    assert resolve_model_source(str(inside), allowed_roots=[root]) == inside.resolve()
    with pytest.raises(ModelLoadError, match="outside the allowed model roots"):
        resolve_model_source(str(outside), allowed_roots=[root])
    # No roots given (None or empty): anything local goes.
    assert resolve_model_source(str(outside), allowed_roots=[]) == outside.resolve()


def test_symlink_escaping_allowed_roots(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = make_model_dir(tmp_path / "elsewhere", config=LLAMA_CONFIG)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelLoadError, match="outside the allowed model roots"):
        resolve_model_source(str(root / "link"), allowed_roots=[root])
    with pytest.raises(ModelLoadError, match="outside the allowed model roots"):
        resolve_model_source(str(root / ".." / "elsewhere"), allowed_roots=[root])


@pytest.mark.parametrize("source", ["a/b/c", "org/..name", "has space", "x--y", "-lead", "org/", "org//x",
                                    "a" * 200, "名前"])
def test_invalid_hub_ids(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    assert not is_valid_hub_id(source)
    with pytest.raises(ModelLoadError):
        resolve_model_source(source)


@pytest.mark.parametrize("source", ["../x", "./x", "~/no-such-model-dir-xyz"])
def test_path_like_sources_never_hit_the_hub(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(source)


@pytest.mark.parametrize("source", ["gpt2", "meta-llama/Llama-3.2-1B", "tiiuae/falcon-7b", "a.b_c-d/x1"])
def test_valid_hub_ids(source):
    assert is_valid_hub_id(source)


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not be downloaded") as err:
        resolve_model_source("lanner-test/does-not-exist", cache_dir=tmp_path / "hub")
    assert time.monotonic() - start < 10
    assert "lanner-test/does-not-exist" in str(err.value) and "local model directory" in str(err.value)


def _public_plain_attributes(config) -> dict:
    from app.models.loader import _plain

    out = {}
    for name in dir(config):
        if name.startswith("_"):
            continue
        try:
            value = getattr(config, name)
        except Exception:
            continue
        if not callable(value) and _plain(value):
            out[name] = value
    return out


@pytest.mark.parametrize("config", [LLAMA_CONFIG,
                                    {"model_type": "RefinedWebModel", "vocab_size": 500, "hidden_size": 64,
                                     "n_head": 4, "n_layer": 2, "multi_query": True, "parallel_attn": True,
                                     "bias": False}],
                         ids=["llama", "falcon-legacy"])
def test_config_view_has_every_plain_attribute_and_unpickles_without_transformers(tmp_path, config):
    """ModelInfo.for_worker(): the config as plain values (fields, properties such as FalconConfig.head_dim,
    attribute_map aliases) equal to the config's own; a process that unpickles it imports neither transformers
    nor torch (a worker unpickles its WorkerConfig before it pins its CPUs, and torch must come after)."""
    from app.models.loader import ConfigView

    info = inspect_model_dir(make_model_dir(tmp_path / "m", config=config))
    worker_info = info.for_worker()
    assert isinstance(worker_info.config, ConfigView) and worker_info.for_worker() == worker_info
    want = _public_plain_attributes(info.config)
    got = {k: getattr(worker_info.config, k) for k in want}
    assert got == want
    assert "hidden_size" in want and ("head_dim" in want or info.arch == "llama")
    with pytest.raises(AttributeError):
        worker_info.config.no_such_field  # noqa: B018 (getattr defaults must keep working)
    code = ("import pickle, sys; info = pickle.loads(sys.stdin.buffer.read()); "
            "print(info.config.hidden_size, info.arch, 'transformers' in sys.modules, "
            "'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(worker_info), capture_output=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == [str(info.config.hidden_size), info.arch, "False", "False"]
