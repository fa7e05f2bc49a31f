"""Quantize-at-load through the checkpoint cache (app/quant/cache.py): `quantize: int8|int4` on an unquantized
model is quantized once by a `lanner quantize` child into <cache_dir>/quantized and served from there by the
torch-free runner; later starts and other replicas reuse it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from app.engine.process import WorkerConfig, _resolve_weights
from app.models.loader import ModelLoadError, inspect_model_dir
from app.quant import cache, kernels
from app.quant.checkpoint import quantize_checkpoint
from app.quant.manifest import read_manifest

pytestmark = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler on this machine")


@pytest.fixture
def source(tmp_path, demo_models_dir) -> Path:
    """A private copy of the demo Llama (fp32), so touching its files changes nobody else's key."""
    return Path(shutil.copytree(demo_models_dir / "demo-llama", tmp_path / "demo-llama"))


def count_quantize_runs(monkeypatch) -> list[Path]:
    runs: list[Path] = []
    real = cache._run_quantize

    def counted(src, out, *args):
        runs.append(out)
        real(src, out, *args)

    monkeypatch.setattr(cache, "_run_quantize", counted)
    return runs


def test_cache_key_follows_what_the_checkpoint_depends_on(source, tmp_path):
    key = cache.cache_key(source, "int4", None, "int8")
    assert cache.cache_key(source, "int4", None, "int8") == key
    others = {cache.cache_key(source, "int8", None, "int8"), cache.cache_key(source, "int4", 64, "int8"),
              cache.cache_key(source, "int4", None, "int4")}
    assert key not in others and len(others) == 3
    assert cache.cache_key(source, "int8", 64, "int4") == cache.cache_key(source, "int8", None, "int8")  # int4 only
    # what the stored numbers do not depend on: where the model lies, mtimes, tokenizer files
    moved = Path(shutil.copytree(source, tmp_path / "elsewhere" / "demo-llama"))
    weights = moved / "model.safetensors"
    os.utime(weights, ns=(1, 1))
    (moved / "tokenizer_config.json").write_text((moved / "tokenizer_config.json").read_text() + " ")
    assert cache.cache_key(moved, "int4", None, "int8") == key
    # what they do depend on: any tensor's values (same shapes, same size, same mtime), the config
    tensors = load_file(weights)
    name = sorted(n for n in tensors if n.endswith("mlp.up_proj.weight"))[0]
    tensors[name][3, 5] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(1, 1))
    changed = cache.cache_key(moved, "int4", None, "int8")
    assert changed != key
    config = json.loads((moved / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (moved / "config.json").write_text(json.dumps(config))
    assert cache.cache_key(moved, "int4", None, "int8") not in (key, changed)


def test_hub_snapshots_are_named_after_their_repository(tmp_path):
    snap = tmp_path / "hub" / "models--TinyLlama--TinyLlama-1.1B-Chat-v1.0" / "snapshots" / "fe8a4ea1ffedaf415f4da2f06"
    snap.mkdir(parents=True)
    assert cache.display_name(snap) == "TinyLlama--TinyLlama-1.1B-Chat-v1.0"
    assert cache.display_name(tmp_path / "hub") == "hub"


def test_quantized_once_then_reused(source, tmp_path, monkeypatch):
    runs = count_quantize_runs(monkeypatch)
    root = tmp_path / "cache"
    first = cache.quantized_copy(source, "int4", root)
    assert runs == [first] and first.parent == root and first.name.startswith("demo-llama-int4-")
    manifest = read_manifest(first)
    assert manifest["mode"] == "int4" and manifest["source"]["path"] == str(source)
    assert (first / "tokenizer.json").is_file() and (first / "config.json").is_file()
    # the same bytes `lanner quantize` writes when run by hand
    by_hand = tmp_path / "by-hand"
    quantize_checkpoint(inspect_model_dir(source), by_hand, "int4")
    assert (first / "model.safetensors").read_bytes() == (by_hand / "model.safetensors").read_bytes()

    assert cache.quantized_copy(source, "int4", root) == first and len(runs) == 1  # reused
    other = cache.quantized_copy(source, "int4", root, group_size=64)  # other options: another checkpoint
    assert other != first and len(runs) == 2 and read_manifest(other)["group_sizes"] == [64]


def test_replicas_starting_together_quantize_once(source, tmp_path, monkeypatch):
    runs = count_quantize_runs(monkeypatch)
    root = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(cache.quantized_copy(source, "int8", root)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(runs) == 1


def test_a_killed_writers_leftovers_are_replaced(source, tmp_path, monkeypatch):
    runs = count_quantize_runs(monkeypatch)
    root = tmp_path / "cache"
    out = cache.cached_checkpoint_dir(root, source, "int8", None, "int8")
    stale = root / f".{out.name}.abc123"  # quantize_checkpoint's temporary directory, its writer killed
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    old = time.time() - cache.STALE_SECONDS - 1
    for path in (stale / "model.safetensors", stale):
        os.utime(path, (old, old))
    live = root / f".{out.name}.def456"  # one a writer touched just now (where locks do not work): kept
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"growing")
    assert cache.quantized_copy(source, "int8", root) == out and runs == [out]
    assert not stale.exists() and live.exists() and read_manifest(out)["mode"] == "int8"
    with open(out / "model.safetensors", "r+b") as f:  # truncated (a crash before the data reached the disk)
        f.truncate(out.joinpath("model.safetensors").stat().st_size - 4096)
    assert not cache.usable(out, "int8")
    assert cache.quantized_copy(source, "int8", root) == out and len(runs) == 2 and cache.usable(out, "int8")
    assert not list(root.glob(f".{out.name}.bad-*"))  # the bad copy was moved aside, then removed


def test_failures_are_reported(tmp_path, source):
    empty = tmp_path / "no-weights"
    shutil.copytree(source, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(cache.QuantizeCacheError, match=r"no-weights failed \(exit status 2"):
        cache.quantized_copy(empty, "int8", tmp_path / "cache")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(cache.QuantizeCacheError, match="cannot write the quantized-checkpoint cache"):
        cache.quantized_copy(source, "int8", blocker / "cache")


def test_a_filesystem_without_locks_is_a_cache_error(source, tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cache.fcntl, "flock", no_locks)
    with pytest.raises(cache.QuantizeCacheError, match="cannot lock .*No locks available"):
        cache.quantized_copy(source, "int8", tmp_path / "cache")


def test_the_child_runs_this_lanner_not_an_app_package_of_the_working_directory(source, tmp_path, monkeypatch):
    decoy = tmp_path / "project" / "app"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('imported the wrong app package')\n")
    (decoy / "__main__.py").write_text("raise SystemExit(0)\n")
    monkeypatch.chdir(tmp_path / "project")
    out = cache.quantized_copy(source, "int8", tmp_path / "cache")
    assert cache.usable(out, "int8")


def worker_config(source: Path, **kw) -> WorkerConfig:
    base = WorkerConfig(model_id="m", model_path=str(source), max_model_len=64, max_num_seqs=2,
                        max_num_batched_tokens=64, cpus=None, num_threads=None, runner="auto", kv_cache_bytes=None,
                        quantize="int4", int4_group_size=64, info=inspect_model_dir(source).for_worker())
    return replace(base, **kw)


def test_worker_resolution(source, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("LANNER_OWN_KERNELS", raising=False)
    root = str(tmp_path / "cache")
    cfg = _resolve_weights(worker_config(source, quantized_cache_dir=root))
    assert cfg.runner == "lite" and Path(cfg.weights_path).parent == Path(root)
    assert cfg.model_path == str(source) and cfg.info.path == source  # config and tokenizer: the source's
    assert read_manifest(Path(cfg.weights_path))["group_sizes"] == [64]  # the options went into the checkpoint
    assert (cfg.int4_group_size, cfg.int4_head, cfg.quantize) == (None, "int8", "int4")
    # no cache, an fp32 model, another backend or a torch kernel path asked for: the torch runner quantizes
    assert _resolve_weights(worker_config(source)).runner == "batched"
    assert _resolve_weights(worker_config(source, quantize="none", quantized_cache_dir=root)).runner == "batched"
    assert _resolve_weights(worker_config(source, woq_backend="torchao", quantized_cache_dir=root)).runner == "batched"
    monkeypatch.setenv("LANNER_OWN_KERNELS", "0")
    assert _resolve_weights(worker_config(source, quantized_cache_dir=root)).runner == "batched"
    monkeypatch.delenv("LANNER_OWN_KERNELS")

    def fail(*args, **kw):
        raise cache.QuantizeCacheError("cannot write the quantized-checkpoint cache /x: read-only file system")

    monkeypatch.setattr(cache, "quantized_copy", fail)
    with caplog.at_level(logging.WARNING, logger="lanner.engine"):  # auto falls back to quantizing at load
        cfg = _resolve_weights(worker_config(source, quantized_cache_dir=root))
    assert cfg.runner == "batched" and cfg.weights_path is None and cfg.int4_group_size == 64
    assert "read-only file system; quantizing at load on the torch runner instead" in caplog.text
    with pytest.raises(ModelLoadError, match="runner: lite cannot serve .* quantized at load: cannot write"):
        _resolve_weights(worker_config(source, runner="lite", quantized_cache_dir=root))
    with pytest.raises(ModelLoadError, match=r"which is off \(quantized_cache: false\)"):
        _resolve_weights(worker_config(source, runner="lite"))
