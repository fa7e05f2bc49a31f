"""The standalone library (app/quant/csrc/lite.cpp) through ctypes, on numpy arrays: no torch, no libtorch.

Built like the torch ops (app/quant/cbuild.py: once per machine, cached by a hash of the sources, flags,
compiler and CPU), from the same kernel headers, with -DLANNER_STANDALONE: its threads are OpenMP's, as
many as OMP_NUM_THREADS says (the worker process sets it to its pinned cores before this library loads).
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path

import numpy as np

from app.quant.cbuild import FLAGS, build_key, build_once, cache_dir, compiler

log = logging.getLogger("lanner.lite")

CSRC = Path(__file__).resolve().parent.parent / "quant" / "csrc"
SOURCE = CSRC / "lite.cpp"
HEADERS = tuple(CSRC / h for h in ("parallel.h", "woq_core.h", "decoder_core.h"))
LITE_FLAGS = (*FLAGS, "-DLANNER_STANDALONE")

_f32p = ctypes.POINTER(ctypes.c_float)
_i64 = ctypes.c_int64
_vp = ctypes.c_void_p


class LiteError(RuntimeError):
    """The library refused a call (its message says why) or could not be built."""


def build(cxx: str | None = None) -> Path:
    """The library for this machine, compiled now unless cached (raises on failure)."""
    cxx = cxx or compiler()
    if cxx is None:
        raise LiteError("no C++ compiler (set CXX or install g++)")
    try:
        target = cache_dir() / build_key(cxx, (SOURCE, *HEADERS), LITE_FLAGS) / "lanner_lite.so"
        return build_once(target, lambda out: ([], [cxx, *LITE_FLAGS, str(SOURCE), "-o", str(out)]),
                          "Lanner's standalone decoder")
    except (RuntimeError, OSError) as exc:  # a failed compile, an unwritable cache
        raise LiteError(f"building {SOURCE.name} failed: {str(exc)[:500]}") from exc


@cache
def lib() -> ctypes.CDLL:
    """The loaded library (built on first use)."""
    path = build()
    try:
        so = ctypes.CDLL(str(path))
    except OSError as exc:
        raise LiteError(f"loading {path} failed: {exc}") from exc
    so.lanner_isa.restype = ctypes.c_char_p
    so.lanner_last_error.restype = ctypes.c_char_p
    so.lanner_int8_mm.argtypes = [_vp, _i64, _i64, _vp, _vp, _i64, _vp]
    so.lanner_int4_mm.argtypes = [_vp, _i64, _i64, _vp, _vp, _vp, _i64, _i64, _vp]
    so.lanner_rms_norm.argtypes = [_vp, _i64, _i64, _vp, ctypes.c_float, _vp]
    so.lanner_layer_norm.argtypes = [_vp, _i64, _i64, _vp, _vp, ctypes.c_float, _vp]
    so.lanner_stack_new.argtypes = [_vp, _i64, _vp, _i64, ctypes.c_double]
    so.lanner_stack_new.restype = _vp
    so.lanner_stack_free.argtypes = [_vp]
    so.lanner_stack_forward.argtypes = [_vp, _vp, _i64, _vp, _vp, _vp, _vp]
    log.info("Lanner's standalone decoder: %s dot products (%s)", isa(so), path)
    return so


def isa(so: ctypes.CDLL | None = None) -> str:
    return (so or lib()).lanner_isa().decode()


def _check(code: int) -> None:
    if code != 0:
        raise LiteError(lib().lanner_last_error().decode())


def ptr(a: np.ndarray | None) -> int | None:
    """The address of a C-contiguous array's data (None: a NULL pointer)."""
    if a is None:
        return None
    if not a.flags.c_contiguous:
        raise ValueError("the library reads C-contiguous arrays only")
    return a.ctypes.data


def _rows(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"expected fp32 [M, K] activations, got {x.dtype} {x.shape}")
    return np.ascontiguousarray(x)


def _is(a: np.ndarray | None, dtype: type, shape: tuple[int, ...]) -> bool:
    return a is not None and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous


def int8_mm(x: np.ndarray, tiles: np.ndarray, scales: np.ndarray, n: int) -> np.ndarray:
    """x fp32 [M, K] times int8 tiles [T, Kp/4, 16, 4] with fp32 scales [16 T] -> [M, n]."""
    x = _rows(x)
    t = tiles.shape[0] if tiles.ndim == 4 else 0
    if not (_is(tiles, np.int8, (t, -(-x.shape[1] // 32) * 8, 16, 4)) and _is(scales, np.float32, (16 * t,))
            and 16 * (t - 1) < n <= 16 * t):
        raise ValueError("int8_mm: shape mismatch")
    y = np.empty((x.shape[0], n), np.float32)
    _check(lib().lanner_int8_mm(ptr(x), x.shape[0], x.shape[1], ptr(tiles), ptr(scales), n, ptr(y)))
    return y


def int4_mm(x: np.ndarray, nib: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int,
            n: int) -> np.ndarray:
    """x fp32 [M, K] times int4 tiles (nib [T, K/4, 8, 4], scales [T, 4 + K/G, 16], zeros [T, K/G, 8]) -> [M, n]."""
    x = _rows(x)
    k, t = x.shape[1], nib.shape[0] if nib.ndim == 4 else 0
    if not (group > 0 and group % 32 == 0 and k % group == 0 and _is(nib, np.uint8, (t, k // 4, 8, 4))
            and _is(scales, np.uint8, (t, 4 + k // group, 16)) and _is(zeros, np.uint8, (t, k // group, 8))
            and 16 * (t - 1) < n <= 16 * t):
        raise ValueError("int4_mm: shape mismatch")
    y = np.empty((x.shape[0], n), np.float32)
    _check(lib().lanner_int4_mm(ptr(x), x.shape[0], k, ptr(nib), ptr(scales), ptr(zeros), group, n, ptr(y)))
    return y


def norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float, kind: str) -> np.ndarray:
    """RMSNorm (kind "rms", no bias) or LayerNorm ("layer") of each row of x fp32 [T, H]."""
    x = _rows(x)
    h = x.shape[1]
    if not (_is(w, np.float32, (h,)) and (b is None or _is(b, np.float32, (h,)))):
        raise ValueError("norm: weight and bias must be contiguous fp32 [H]")
    y = np.empty_like(x)
    if kind == "rms":
        _check(lib().lanner_rms_norm(ptr(x), x.shape[0], x.shape[1], ptr(w), eps, ptr(y)))
    else:
        _check(lib().lanner_layer_norm(ptr(x), x.shape[0], x.shape[1], ptr(w), ptr(b), eps, ptr(y)))
    return y


class Stack:
    """lite.cpp's layer stack: references to the arrays in `keep` (held here so that they outlive it)."""

    def __init__(self, ints: list[int], arrays: list[np.ndarray | None], eps: float) -> None:
        self._keep = arrays
        self.head_dim, self.hidden = ints[5], ints[8]  # lite.cpp's header: what forward's arrays must match
        ints_a = np.asarray(ints, dtype=np.int64)
        ptrs = (ctypes.c_void_p * len(arrays))(*(ptr(a) for a in arrays))
        handle = lib().lanner_stack_new(ptr(ints_a), len(ints_a), ptrs, len(arrays), eps)
        if not handle:
            raise LiteError(lib().lanner_last_error().decode())
        self._handle = handle

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            lib().lanner_stack_free(handle)
            self._handle = None

    def forward(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, slots: np.ndarray,
                positions: np.ndarray) -> None:
        """x fp32 [T, H] through every layer, in place (see lite.cpp)."""
        t, d = x.shape[0], self.head_dim
        if not (_is(x, np.float32, (t, self.hidden)) and _is(cos, np.float32, (t, d)) and _is(sin, np.float32, (t, d))
                and _is(slots, np.int64, (t,)) and _is(positions, np.int64, (t,))):
            raise ValueError("stack forward: expected C-contiguous x [T, hidden], cos and sin [T, head_dim] (fp32), "
                             "slots and positions [T] (int64)")
        _check(lib().lanner_stack_forward(self._handle, ptr(x), t, ptr(cos), ptr(sin), ptr(slots), ptr(positions)))
