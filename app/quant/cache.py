"""Quantize-at-load through a cached checkpoint, so a worker serving `quantize: int8|int4` needs no torch.

`runner: auto` (and `runner: lite`) with `quantize` set on an unquantized model does not quantize inside the
worker: a short-lived child process runs `lanner quantize` into `<cache_dir>/quantized/<name>-<mode>-<key>/`,
and the worker then serves that directory on the torch-free runner (app/lite), like any `lanner quantize`
output.  The next start, and every replica on the same host and cache volume, reuses it: quantizing happens
once per model and options (seed 002: "instances don't re-quantize").

The key hashes everything the checkpoint depends on: the source directory's path and the name, size and
mtime of each of its files (a changed weight file is a new key), the mode, int4 group size and head, this
Lanner's version and the checkpoint format.  Writers of one key take a file lock, so replicas starting
together quantize once and the others wait; `lanner quantize` writes into a temporary directory renamed into
place at the end, so a reader never sees half a checkpoint, and the temporary directory of a writer that was
killed is removed by the next one.  No torch here: the worker imports this.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.models.loader import ModelLoadError
from app.quant.manifest import FORMAT_HASH, is_quantized_dir, read_manifest

log = logging.getLogger("lanner.quant")

class QuantizeCacheError(RuntimeError):
    """The cached checkpoint could not be made (no writable cache, or `lanner quantize` failed)."""


def cache_key(source: Path, mode: str, group_size: int | None, int4_head: str) -> str:
    """What a cached checkpoint of `source` depends on, hashed (16 hex digits)."""
    from app import __version__

    source = Path(source).resolve()
    files = []
    for f in sorted(source.iterdir()):
        if f.is_file():  # follows a hub snapshot's symlinks to their blobs
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    what = {"source": str(source), "files": files, "mode": mode,
            "group_size": group_size if mode == "int4" else None,
            "int4_head": int4_head if mode == "int4" else None,
            "lanner": __version__, "format": FORMAT_HASH}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def cached_checkpoint_dir(cache_root: Path, source: Path, mode: str, group_size: int | None,
                          int4_head: str) -> Path:
    source = Path(source).resolve()
    return Path(cache_root) / f"{source.name}-{mode}-{cache_key(source, mode, group_size, int4_head)}"


def _usable(path: Path, mode: str) -> bool:
    if not is_quantized_dir(path):
        return False
    try:
        return read_manifest(path)["mode"] == mode
    except ModelLoadError:
        return False


def quantized_copy(source: Path, mode: str, cache_root: Path, *, group_size: int | None = None,
                   int4_head: str = "int8") -> Path:
    """The cached pre-quantized checkpoint of the model directory `source`, made now if there is none
    (QuantizeCacheError when that fails)."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize mode must be int8 or int4, got {mode!r}")
    out = cached_checkpoint_dir(cache_root, source, mode, group_size, int4_head)
    if _usable(out, mode):
        log.info("serving the %s checkpoint of %s cached in %s", mode, source, out)
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f".{out.name}.lock", "a")  # noqa: SIM115 - held until the checkpoint exists
    except OSError as exc:
        raise QuantizeCacheError(f"cannot write the quantized-checkpoint cache {out.parent}: {exc}") from exc
    with lock:
        if not _try_lock(lock):
            log.info("waiting for another process quantizing %s into %s", source, out)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(out, mode):  # the process we waited for made it
            log.info("serving the %s checkpoint of %s cached in %s", mode, source, out)
            return out
        for stale in out.parent.glob(f".{out.name}.*"):  # a killed writer's temporary directory, or a bad copy
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        _run_quantize(Path(source), out, mode, group_size, int4_head)
    if not _usable(out, mode):
        raise QuantizeCacheError(f"`lanner quantize` left no usable checkpoint in {out}")
    return out


def _try_lock(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_quantize(source: Path, out: Path, mode: str, group_size: int | None, int4_head: str) -> None:
    cmd = [sys.executable, "-m", "app", "quantize", str(source), "--bits", "8" if mode == "int8" else "4",
           "--out", str(out)]
    if mode == "int4":
        cmd += ["--int4-head", int4_head] + (["--group-size", str(group_size)] if group_size else [])
    log.info("quantizing %s to %s once, into the cache (%s); later starts reuse it", source, mode, out)
    t0 = time.perf_counter()
    # the child inherits this worker's CPU affinity and OMP_NUM_THREADS; its torch and its peak memory (one
    # layer in fp32 over the output) are gone when it exits
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, check=False)
    except OSError as exc:
        raise QuantizeCacheError(f"cannot start `lanner quantize`: {exc}") from exc
    if done.returncode != 0:
        raise QuantizeCacheError(f"`lanner quantize` exited with status {done.returncode} "
                                 "(its error is in the log above)")
    log.info("quantized %s in %.1f s", source, time.perf_counter() - t0)
