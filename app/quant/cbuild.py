"""Building Lanner's C++ libraries for the running machine, once, into a cache (no torch import here).

Two libraries are built from app/quant/csrc: the torch ops (app/quant/kernels.py, linked against libtorch)
and the standalone decoder of workers without libtorch (app/lite/native.py).  Both are compiled with the
system C++ compiler for the CPU that runs it (`-march=native`) and cached under $LANNER_KERNEL_CACHE
(default ~/.cache/lanner/kernels) in a directory named by a hash of everything that shapes the binary
(`build_key`); processes that race for the same key build it once, under a file lock, and a library appears
in the cache only when complete (atomic rename).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("lanner.quant")

CACHE_ENV = "LANNER_KERNEL_CACHE"
CXX_ENV = "CXX"
# -march=native: the compiler targets the machine that runs it, so AVX-512-VNNI, AVX-VNNI, AVX2 or plain C++
# code is picked where it exists
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w")


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "lanner" / "kernels"


def compiler() -> str | None:
    return shutil.which(os.environ.get(CXX_ENV, "") or "c++") or shutil.which("g++") or shutil.which("clang++")


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return line
    except OSError:
        pass
    return ""


def switched_off(env: str) -> bool:
    """Whether an on/off environment variable (on by default) says off: 0, false, no or off."""
    return os.environ.get(env, "1").strip().lower() in ("0", "false", "no", "off")


def build_key(cxx: str, files: Iterable[Path], flags: Iterable[str], extra: Iterable[bytes] = ()) -> str:
    """A hash of the sources and headers, the flags, the compiler's version, the CPU's flags, the platform and
    `extra` (e.g. torch's version)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in files), " ".join(flags).encode(), version.encode(), *extra,
                 cpu_flags().encode(), sysconfig.get_platform().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def build_once(target: Path, commands: Callable[[Path], tuple[list[list[str]], list[str]]], what: str) -> Path:
    """`target`, compiled now unless it exists (raises on failure).  `commands(out)` gives the compile
    commands (run in parallel) and the link command that writes `out`."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            compiles, link = commands(out)
            cxx = link[0]
            log.info("building %s for this CPU (once per machine): %s", what, " ".join(link[:8]))
            jobs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    for cmd in compiles]
            errors = [(job.returncode, err) for job in jobs for _, err in [job.communicate()]]  # wait for all
            for code, err in errors:
                if code != 0:
                    raise RuntimeError(f"{cxx} failed ({code}): {err.strip()[-2000:]}")
            done = subprocess.run(link, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{cxx} (link) failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: readers never see a half-written library
    return target
