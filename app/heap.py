"""Process memory controls: glibc's heap, lazily resident zero arrays (no torch here: workers with and
without torch call them)."""

from __future__ import annotations

import ctypes
import math
import mmap

import numpy as np


def trim_heap() -> None:
    """glibc only: give the heap's free pages back to the OS (malloc_trim).  Called after each part: the
    allocator otherwise keeps freed quantizer blocks resident; and by a worker whose engine goes idle
    (`EngineCore.on_idle`): a 681-token prompt left a TinyLlama int4 worker 40 MB larger, 4.5 MB after it.
    Measured serving a 178 MB fp32 model (5 layers of 34 MB) with quantize-at-load: int8 peak 96 MB over
    baseline without it, 62 MB with it (47 MB of them the model); int4 74-104 vs 83-95 MB (31 MB the
    model).  The rest is glibc keeping
    multi-MB blocks in its heap once its mmap threshold has grown (pinning the threshold at 1 MiB gives
    57 / 59 MB), which `lanner quantize` does (`return_freed_memory_promptly`) and a server does not."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def return_freed_memory_promptly(threshold: int = 1 << 20) -> bool:
    """glibc only: serve allocations of `threshold` bytes or more with mmap, so a freed block leaves the
    process at once.  By default glibc raises that threshold to the largest block freed so far (up to
    32 MiB); after the first few, the quantizer's blocks come from the heap and freed ones stay resident.
    Measured on a 180 MB fp32 model (int4): peak RSS 120 MB over baseline without this, 55 MB with it.
    Meant for `lanner quantize`, a process of its own: a server keeps glibc's default (its per-call
    buffers are faster reused from the heap).  Returns whether the setting was applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def lazy_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zero array whose memory becomes resident only where it is written: its own anonymous mapping, which
    the kernel fills with zeros page by page on first touch (the KV caches of both runners).  `torch.zeros`
    writes every page at once, so a cache sized for `max_num_seqs` full-length sequences was resident from
    start-up (1.47 GiB for TinyLlama's 32 slots of 2048 tokens) however few of them ran; now it grows with the
    slots used up to the busiest moment so far."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)  # the array keeps the mapping alive
