"""Quantize-at-load through a cached checkpoint, so a worker serving `quantize: int8|int4` needs no torch.

`runner: auto` (and `runner: lite`) with `quantize` set on an unquantized model does not quantize inside the
worker: a short-lived child process writes a `lanner quantize` checkpoint into
`<cache_dir>/quantized/<name>-<mode>-<key>/`, and the worker then serves that directory on the torch-free
runner (app/lite).  The next start, and every replica on the same host and cache volume, reuses it: quantizing
happens once per model and options (seed 002: "instances don't re-quantize").

The key hashes what the stored numbers depend on, and nothing else (not the path, not mtimes, not the
tokenizer files, so a copy of the same model elsewhere, or re-downloaded, finds the same checkpoint):
config.json; each weight file's name, size, safetensors header and 256 pages sampled evenly over its data (a
changed tensor anywhere but in a tiny corner changes the key; reading them costs 1 MiB a file); the mode,
int4 group size and head; the quantizer's own source code and torch's version, which compute the numbers;
and the checkpoint format.  Old entries are never deleted: remove a directory to reclaim its space.

Writers of one key take an exclusive `flock` on a lock file beside it, so replicas starting together quantize
once and the others wait (across hosts this needs a filesystem whose flock works there, e.g. NFSv4).  The
checkpoint is written into a temporary directory, synced and renamed into place (quantize_checkpoint), so a
reader sees no checkpoint or a whole one; a found one is checked (manifest, mode, size of the weights file)
before it is used.  A temporary directory left by a killed writer is removed by the next writer once no file
in it has changed for `STALE_SECONDS`.  No torch here: the worker imports this; the child imports torch.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from app.models.loader import ModelLoadError
from app.quant.manifest import FORMAT_HASH, WEIGHTS_FILE, is_quantized_dir, read_manifest

log = logging.getLogger("lanner.quant")

SAMPLED_PAGES = 256  # pages of each weight file read for the key
PAGE = 4096
STALE_SECONDS = 120.0  # a temporary directory untouched this long belongs to a dead writer
# The code that decides the stored numbers: a change to any of these files is a new key.
QUANTIZER_SOURCES = ("quant/woq.py", "quant/checkpoint.py", "quant/manifest.py", "models/llama.py",
                     "models/falcon.py", "models/arch.py")
_APP_DIR = Path(__file__).resolve().parents[1]


class QuantizeCacheError(RuntimeError):
    """The cached checkpoint could not be made or used (no writable cache, no file lock, or the quantizing
    child failed)."""


def _file_digest(path: Path) -> list:
    """name, size, header and sampled data pages of a safetensors file (hashed); a shard index whole."""
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        return [path.name, size, hashlib.sha256(path.read_bytes()).hexdigest()]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        h.update(f.read(min(header_len, size)))
        start = 8 + header_len
        span = max(size - start, 0)
        for i in range(SAMPLED_PAGES if span else 0):
            f.seek(start + span * i // SAMPLED_PAGES)
            h.update(f.read(PAGE))
    return [path.name, size, h.hexdigest()]


def _weight_files(source: Path) -> list[Path]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [index] + [source / n for n in names]
    return sorted(source.glob("*.safetensors"))


def _quantizer_digest() -> str:
    h = hashlib.sha256()
    for rel in QUANTIZER_SOURCES:
        h.update(rel.encode() + b"\0" + (_APP_DIR / rel).read_bytes())
    try:
        h.update(metadata.version("torch").encode())
    except metadata.PackageNotFoundError:
        pass
    return h.hexdigest()


def cache_key(source: Path, mode: str, group_size: int | None, int4_head: str) -> str:
    """What a cached checkpoint of `source` depends on, hashed (16 hex digits)."""
    source = Path(source)
    what = {"config": hashlib.sha256((source / "config.json").read_bytes()).hexdigest(),
            "weights": [_file_digest(f) for f in _weight_files(source)], "mode": mode,
            "group_size": group_size if mode == "int4" else None,
            "int4_head": int4_head if mode == "int4" else None,
            "quantizer": _quantizer_digest(), "format": FORMAT_HASH}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def display_name(source: Path) -> str:
    """The model's name for the cache directory: the directory's, or for a hub snapshot
    (.../models--org--name/snapshots/<revision>) the repository's."""
    source = Path(source).resolve()
    if source.parent.name == "snapshots" and source.parent.parent.name.startswith("models--"):
        return source.parent.parent.name.removeprefix("models--")
    return source.name


def cached_checkpoint_dir(cache_root: Path, source: Path, mode: str, group_size: int | None,
                          int4_head: str) -> Path:
    return Path(cache_root) / f"{display_name(source)}-{mode}-{cache_key(source, mode, group_size, int4_head)}"


def usable(path: Path, mode: str) -> bool:
    """A whole checkpoint of this format and mode: its manifest reads, and the weights file has the size its
    header and the manifest's byte count add up to (a truncated file does not)."""
    if not is_quantized_dir(path):
        return False
    try:
        manifest = read_manifest(path)
        weights = path / WEIGHTS_FILE
        with open(weights, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
        return manifest["mode"] == mode and weights.stat().st_size == 8 + header_len + manifest["weights_bytes"]
    except (ModelLoadError, OSError, KeyError, TypeError, struct.error):
        return False


def quantized_copy(source: Path, mode: str, cache_root: Path, *, group_size: int | None = None,
                   int4_head: str = "int8") -> Path:
    """The cached pre-quantized checkpoint of the model directory `source`, made now if there is none
    (QuantizeCacheError when that fails)."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize mode must be int8 or int4, got {mode!r}")
    try:
        out = cached_checkpoint_dir(cache_root, source, mode, group_size, int4_head)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise QuantizeCacheError(f"cannot read {source} to find its quantized checkpoint: {exc}") from exc
    if usable(out, mode):
        log.info("serving the %s checkpoint of %s cached in %s", mode, source, out)
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f".{out.name}.lock", "a")  # noqa: SIM115 - held until the checkpoint exists
    except OSError as exc:
        raise QuantizeCacheError(f"cannot write the quantized-checkpoint cache {out.parent}: {exc}") from exc
    with lock:
        _lock(lock, out)
        if usable(out, mode):  # the process we waited for made it
            log.info("serving the %s checkpoint of %s cached in %s", mode, source, out)
            return out
        try:
            _clear_leftovers(out)
        except OSError as exc:
            raise QuantizeCacheError(f"cannot clear the unusable entry {out}: {exc}") from exc
        _run_quantize(Path(source), out, mode, group_size, int4_head)
    if not usable(out, mode):
        raise QuantizeCacheError(f"quantizing left no usable checkpoint in {out}")
    return out


def _lock(lock, out: Path) -> None:
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process quantizing into %s", out)
            fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as exc:  # ENOLCK and friends: a filesystem without working locks
        raise QuantizeCacheError(f"cannot lock {lock.name}: {exc}") from exc


def _clear_leftovers(out: Path) -> None:
    """Under the lock: move an unusable `out` aside and remove it, and remove temporary directories of `out`
    that no live writer touches (none, where the lock works; the age test covers filesystems where it does
    not)."""
    if out.exists():
        aside = out.with_name(f".{out.name}.bad-{os.getpid()}")
        os.replace(out, aside)  # never delete in place: a reader may hold the files
        shutil.rmtree(aside, ignore_errors=True)
    now = time.time()
    for stale in glob.glob(os.path.join(glob.escape(str(out.parent)), glob.escape(f".{out.name}.") + "*")):
        stale = Path(stale)
        if not stale.is_dir():
            continue
        try:
            newest = max([stale.stat().st_mtime] + [f.stat().st_mtime for f in stale.iterdir()])
        except OSError:
            continue
        if now - newest >= STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the worker died before the line above took effect
        os._exit(1)


def _run_quantize(source: Path, out: Path, mode: str, group_size: int | None, int4_head: str) -> None:
    # `lanner quantize` through `python -c` with this Lanner's package directory first on sys.path: not
    # `-m app`, which would run an `app` package of the current directory
    code = f"import sys; sys.path[0] = {str(_APP_DIR.parent)!r}; from app.cli import main; main(sys.argv[1:])"
    args = ["quantize", str(source), "--bits", "8" if mode == "int8" else "4", "--out", str(out)]
    if mode == "int4":
        args += ["--int4-head", int4_head] + (["--group-size", str(group_size)] if group_size else [])
    cmd = [sys.executable, "-c", code, *args]
    log.info("quantizing %s to %s once, into the cache (%s); later starts reuse it", source, mode, out)
    t0 = time.perf_counter()
    parent = os.getpid()
    # the child inherits this worker's CPU affinity and OMP_NUM_THREADS; its torch and its peak memory (one
    # layer in fp32 over the output) are gone when it exits, and it dies with the worker
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, preexec_fn=lambda: _die_with_parent(parent),
                              check=False)
    except OSError as exc:
        raise QuantizeCacheError(f"cannot start the quantizing child: {exc}") from exc
    if done.returncode != 0:
        raise QuantizeCacheError(f"quantizing {source} failed (exit status {done.returncode}; its error is in "
                                 "the log above)")
    log.info("quantized %s in %.1f s", source, time.perf_counter() - t0)
