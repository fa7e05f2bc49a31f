"""Lanner's own WOQ kernels (app/quant/csrc/woq_kernels.cpp): built for the running CPU on first use.

The same library carries the decoder's small C++ ops (app/quant/csrc/decoder_ops.cpp: RMSNorm, RoPE + KV
store, decode attention; used through app/models/ops.py) and the whole layer stack of a step in one call
(decoder_stack.cpp, app/models/stack.py), so it is built for fp32 models too.

Why: ATen's `_weight_int8pack_mm` streams int8 weights at 15-16 GB/s on the 2-core EPYC where llama.cpp
reads 23-26 GB/s, and its int8/int4 kernels compute in (emulated or native) bf16, so batches of rows are
compute-bound.  Lanner's kernels read weights packed in tiles of 16 output rows with k in quads
(`pack_int8`, `pack_int4`), one sequential stream per thread, and multiply them with integer dot
products (VNNI `vpdpbusd`, or AVX2 `maddubs`) against activations quantized per row in blocks of 32, the
scheme of llama.cpp's Q8 activations.  Measured on that machine (2 threads): 32000 x 2048 int8 head at
M=1 2.1 ms against ATen's 4.2; 2048 -> 11264 at M=16 2.5 ms (int8) / 2.2 ms (int4) against 7.1 / 4.8, at
M=64 7.2 / 7.9 against 27 / 18 (bench numbers in docs/quantization.md).

Build: the C++ files of SOURCES, compiled into one library with the system C++ compiler against torch's
headers (`-O3 -march=native -fopenmp`: the compiler targets the machine that runs it, so AVX-512-VNNI,
AVX-VNNI, AVX2 or plain C++ are picked where they exist), registered as `torch.ops.lanner.*`, and threaded
with at::parallel_for (torch's own OpenMP pool, the size `torch.set_num_threads` gave).  The shared object is
cached under $LANNER_KERNEL_CACHE (default ~/.cache/lanner/kernels) by a hash of the sources, the flags,
the compiler, torch's version and the CPU's flags, so a fresh machine pays the build once (~20 s on 2
cores: the sources compile in parallel); processes that race for it build under a file lock.  No
compiler, a failed build or LANNER_OWN_KERNELS=0 leave Lanner on ATen's kernels and ops (the reason is
logged and reported).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from app.quant import tiles as layouts
from app.quant.cbuild import (  # noqa: F401 - CACHE_ENV, cache_dir, switched_off: used through this module
    CACHE_ENV,
    FLAGS,
    build_key,
    build_once,
    cache_dir,
    compiler,
    switched_off,
)
from app.quant.tiles import BLOCK, QUAD, TILE, UNIT_ROWS, padded_k  # noqa: F401 - re-exported

log = logging.getLogger("lanner.quant")

CSRC = Path(__file__).parent / "csrc"
# The WOQ matmuls, the decoder's small per-layer ops (RMSNorm, RoPE + KV store, decode attention) and the
# whole layer stack in one call (decoder_stack.cpp): one library.
SOURCES = (CSRC / "woq_kernels.cpp", CSRC / "decoder_ops.cpp", CSRC / "decoder_stack.cpp")
HEADERS = tuple(CSRC / h for h in ("lanner_ops.h", "parallel.h", "woq_core.h", "decoder_core.h"))  # included
# by the sources (part of the build key)
ENABLE_ENV = "LANNER_OWN_KERNELS"


@dataclass(frozen=True)
class KernelBuild:
    """The outcome of loading the kernels in this process."""

    ok: bool
    detail: str  # the library path, or why the kernels are not in use
    isa: str = ""  # the dot-product code compiled in: avx512-vnni | avx-vnni | avx2 | scalar


def _commands(cxx: str, out: Path, extra: tuple[str, ...] = ()) -> tuple[list[list[str]], list[str]]:
    """The compile commands (one per source: they run in parallel) and the link command for `out`."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = [f"-L{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    objects = [out.with_name(f"{src.stem}.o") for src in SOURCES]
    compiles = [[cxx, *FLAGS, *extra, abi, *includes, "-c", str(src), "-o", str(obj)]
                for src, obj in zip(SOURCES, objects)]
    return compiles, [cxx, *FLAGS, *extra, *map(str, objects), "-o", str(out), *libdirs, "-ltorch_cpu", "-lc10"]


def _build_key(cxx: str, extra: tuple[str, ...] = ()) -> str:
    return build_key(cxx, (*SOURCES, *HEADERS), (*FLAGS, *extra), (torch.__version__.encode(),))


def build(cxx: str, extra: tuple[str, ...] = ()) -> Path:
    """The kernels' shared object for this machine, compiled now unless cached (raises on failure).
    `extra` compiler flags build a variant, e.g. ("-mno-avx512vnni", "-mno-avxvnni") for the AVX2 code
    on a VNNI machine (the tests compare the variants)."""
    target = cache_dir() / _build_key(cxx, extra) / "lanner_woq_kernels.so"
    return build_once(target, lambda out: _commands(cxx, out, extra), "Lanner's kernels")


@cache
def load() -> KernelBuild:
    """Build (if needed) and load the kernels into this process, once; never raises."""
    if switched_off(ENABLE_ENV):
        return KernelBuild(False, f"{ENABLE_ENV}=0")
    missing = [str(src) for src in (*SOURCES, *HEADERS) if not src.exists()]
    if missing:
        return KernelBuild(False, f"kernel source {missing[0]} is missing")
    cxx = compiler()
    if cxx is None:
        return KernelBuild(False, "no C++ compiler (set CXX or install g++)")
    try:
        path = build(cxx)
        torch.ops.load_library(str(path))
        isa = str(torch.ops.lanner.isa())
    except Exception as exc:  # noqa: BLE001 - any build/load failure means ATen's kernels
        log.warning("Lanner's WOQ kernels are unavailable, using ATen's: %s", exc)
        return KernelBuild(False, f"build failed: {str(exc).splitlines()[0][:300]}")
    log.info("Lanner's WOQ kernels: %s dot products (%s)", isa, path)
    return KernelBuild(True, str(path), isa)


def available() -> bool:
    return load().ok


# --------------------------------------------------------------------------- weight layouts


def empty_tiles(mode: str, n: int, k: int, group_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """Uninitialised tensors of pack_int8's (tiles, scales) or pack_int4's (nibbles, scales, zeros) layout
    for an [n, k] weight."""
    tiles = -(-n // TILE)
    if mode == "int8":
        return (torch.empty(tiles, padded_k(k) // QUAD, TILE, QUAD, dtype=torch.int8), torch.empty(tiles * TILE))
    groups = k // group_size  # type: ignore[operator]
    return (torch.empty(tiles, k // QUAD, TILE // 2, QUAD, dtype=torch.uint8),
            torch.empty(tiles, UNIT_ROWS + groups, TILE, dtype=torch.uint8),
            torch.empty(tiles, groups, TILE // 2, dtype=torch.uint8))


def pack_int8(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """app/quant/tiles.py's `pack_int8` of torch tensors: q int8 [N, K], scales [N] -> tiles int8
    [T, Kp/4, 16, 4] and fp32 scales [16 T]."""
    packed = layouts.pack_int8(q.numpy(), scales.float().numpy())
    return tuple(map(torch.from_numpy, packed))  # type: ignore[return-value]


def unpack_int8(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """pack_int8's tiles -> q int8 [n, k]."""
    t, quads = tiles.shape[:2]
    return tiles.permute(0, 2, 1, 3).reshape(t * TILE, quads * QUAD)[:n, :k]


def code_units(widest: torch.Tensor) -> torch.Tensor:
    """The unit 2^e of 8-bit scale codes for each row's widest step (fp32 [...], >= 0): the smallest e with
    widest < 256 * 2^e, within [-126, 119] (2^e a normal float, 255 * 2^e finite); an infinite step gets the
    largest.  lanner::int4_quantize computes the same in C++."""
    exponent = torch.where(widest.isinf(), 127, torch.frexp(widest).exponent).sub_(8).clamp_(-126, 119)
    return torch.ldexp(torch.ones_like(widest), exponent)


def int4_scale_codes(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """app/quant/tiles.py's `int4_scale_codes` of a torch tensor: scales [N, G'] -> (codes uint8, units fp32)."""
    return tuple(map(torch.from_numpy, layouts.int4_scale_codes(scales.float().numpy())))  # type: ignore[return-value]


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """app/quant/tiles.py's `pack_int4` of torch tensors: the portable int4 form -> nibble tiles, scales (row
    units, then codes) and zero points in Lanner's tile layout."""
    packed = layouts.pack_int4(qweight.numpy(), scales.float().numpy(), zeros.to(torch.uint8).numpy())
    return tuple(map(torch.from_numpy, packed))  # type: ignore[return-value]


def unpack_int4(nib: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_int4's tiles -> (q uint8 [n, K] values 0..15, scales fp32 [n, K/G], zeros uint8 [n, K/G])."""
    tiles, quads = nib.shape[:2]
    q = torch.cat((nib & 0x0F, nib >> 4), dim=2).permute(0, 2, 1, 3).reshape(tiles * TILE, quads * QUAD)[:n]
    units = scales[:, :UNIT_ROWS].contiguous().view(torch.float32).reshape(tiles * TILE, 1)
    codes = scales[:, UNIT_ROWS:].transpose(1, 2).reshape(tiles * TILE, -1)
    s = (codes.float() * units)[:n]
    z = torch.cat((zeros & 0x0F, zeros >> 4), dim=2).transpose(1, 2).reshape(tiles * TILE, -1)[:n]
    return q, s, z.contiguous()


def int8_mm(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """x fp32 [M, K] @ (the int8 weight in `tiles` * scales)^T -> [M, n] fp32 (x quantized per 32-block)."""
    return torch.ops.lanner.int8_mm(x, tiles, scales, n)


def int4_mm(x: torch.Tensor, nib: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
            n: int) -> torch.Tensor:
    """x fp32 [M, K] @ (the int4 weight in `nib`, `scales`, `zeros`)^T -> [M, n] fp32 (x quantized per
    32-block)."""
    return torch.ops.lanner.int4_mm(x, nib, scales, zeros, group, n)


if __name__ == "__main__":  # `python -m app.quant.kernels`: build now and say where (Dockerfile, CI)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = load()
    print(f"ok: {result.detail} ({result.isa})" if result.ok else f"unavailable: {result.detail}")
    sys.exit(0 if result.ok else 1)
