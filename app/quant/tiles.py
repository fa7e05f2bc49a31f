"""Lanner's kernel tile layouts, packed with numpy (no torch): the one packing code of both loaders, the torch
runner's (app/quant/kernels.py wraps it for torch tensors) and the torch-free runner's (app/lite/model.py, which
feeds it row blocks read from the file).  woq_kernels.cpp's comment describes the layouts and why.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TILE = 16  # output rows per weight tile (kTile in the C++ source)
BLOCK = 32  # activation quantization block along K (kBlock); K is padded to a multiple of it
QUAD = 4  # k per weight group of the dot-product instructions
UNIT_ROWS = 4  # int4 tiles: the 16 fp32 row units take the first 4 rows of 16 bytes of a tile's scales
INT4_GROUP_SIZES = (32, 64, 128, 256)  # int4 group sizes (multiples of BLOCK; also what ATen's int4 kernel takes)
# weight bytes packed at once: the load's temporaries stay this small.  (A fixed 256 tiles was 4096 rows: 74 MB
# of int8 at falcon-7b's K = 18176, plus temporaries of the same size, which made the load's peak ~100-190 MiB
# above its resident size on each such layer.)
PACK_BYTES = 2 << 20
Rows = Callable[[int, int], np.ndarray]  # rows [r0, r1) of a stored matrix


def padded_k(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def _rows_of(q: np.ndarray | Rows) -> Rows:
    return (lambda r0, r1: q[r0:r1]) if isinstance(q, np.ndarray) else q


def pack_int8(q: np.ndarray | Rows, scales: np.ndarray, n: int | None = None, k: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """q int8 [N, K] (or a reader of its rows, with n and k), scales [N] -> tiles int8 [T, Kp/4, 16, 4]
    (tiles[t, k/4, j, k%4] = q[16t + j, k], T = ceil(N/16), Kp = K rounded up to 32) and scales fp32 [16 T];
    rows and k past the matrix are zero, and -128 becomes -127 (the AVX2 kernel's sign trick cannot negate
    -128; see woq_kernels.cpp).  Goes PACK_BYTES of weights at a time."""
    if isinstance(q, np.ndarray):
        n, k = q.shape
    rows = _rows_of(q)
    tiles, kp = -(-n // TILE), padded_k(k)
    out = np.empty((tiles, kp // QUAD, TILE, QUAD), np.int8)
    step = max(1, PACK_BYTES // (TILE * kp))
    for t0 in range(0, tiles, step):
        t1 = min(t0 + step, tiles)
        r0, r1 = t0 * TILE, min(t1 * TILE, n)
        block = np.zeros(((t1 - t0) * TILE, kp), np.int8)
        block[:r1 - r0, :k] = rows(r0, r1)
        np.maximum(block, -127, out=block)
        out[t0:t1] = block.reshape(t1 - t0, TILE, kp // QUAD, QUAD).transpose(0, 2, 1, 3)
    s = np.zeros(tiles * TILE, np.float32)
    s[:n] = scales
    return out, s


def int4_scale_codes(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales [N, G'] on quantize_int4's row code grids -> (codes uint8 [N, G'], units fp32 [N]) with
    scales = codes * units[:, None], units powers of two (the smallest 2^e with the row's widest scale below
    256 * 2^e, e in [-126, 119]: app/quant/kernels.py's `code_units`).  Raises ValueError for scales that are
    not on such a grid (made by another quantizer, or by Lanner before checkpoint format 4).  Goes PACK_BYTES
    of fp32 scales at a time: whole, falcon-7b's 4544 x 568 scales of its largest Linear made ~35 MiB of float
    temporaries at the load's peak."""
    n, groups = scales.shape
    codes = np.empty((n, groups), np.uint8)
    units = np.empty(n, np.float32)
    step = max(1, PACK_BYTES // (4 * max(1, groups)))
    for r0 in range(0, n, step):
        s = scales[r0:r0 + step].astype(np.float32)
        widest = s.max(axis=1)
        _, exponent = np.frexp(widest)
        exponent = np.where(np.isinf(widest), 127, exponent) - 8
        u = np.ldexp(np.float32(1), np.clip(exponent, -126, 119)).astype(np.float32)
        c = s / u[:, None]
        if not ((c == np.round(c)) & (c >= 0) & (c <= 255)).all():
            raise ValueError("int4 scales are not 8-bit codes times a power of two per row (quantize_int4's "
                             "grid); quantize the weights again with this version of Lanner")
        codes[r0:r0 + step] = c
        units[r0:r0 + step] = u
    return codes, units


def pack_int4(qweight: np.ndarray | Rows, scales: np.ndarray | Rows, zeros: np.ndarray | Rows, n: int | None = None,
              k: int | None = None, groups: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The portable int4 form (qweight uint8 [N, K/2], byte j = q[2j] | q[2j+1] << 4; fp32 scales [N, K/G] on
    row code grids, see int4_scale_codes; zeros uint8 [N, K/G], 0..15; arrays, or readers of their rows with n,
    k and groups) -> nibble tiles uint8 [T, K/4, 8, 4] (nib[t, k/4, j, k%4] = q[16t+j, k] | q[16t+j+8, k] << 4),
    scales uint8 [T, 4 + K/G, 16] (per tile the 16 rows' fp32 units in the first 4 rows of bytes, then each
    group's 16 codes: scale[16t+j, g] = codes[t, 4+g, j] * unit[16t+j]) and zero points packed like the
    weights, uint8 [T, K/G, 8] (zp[t, g, j] = z[16t+j, g] | z[16t+j+8, g] << 4); rows past N are zero.  K is a
    multiple of G, itself of 32.  Goes PACK_BYTES of weights (and their rows' scales and zero points) at a
    time."""
    if isinstance(qweight, np.ndarray):
        n, k = qweight.shape[0], 2 * qweight.shape[1]
    if isinstance(scales, np.ndarray):
        groups = scales.shape[1]
    q_rows, s_rows, z_rows = map(_rows_of, (qweight, scales, zeros))
    tiles = -(-n // TILE)
    nib = np.empty((tiles, k // QUAD, TILE // 2, QUAD), np.uint8)
    sc = np.empty((tiles, UNIT_ROWS + groups, TILE), np.uint8)
    zp = np.empty((tiles, groups, TILE // 2), np.uint8)
    step = max(1, PACK_BYTES // (TILE * k))
    for t0 in range(0, tiles, step):
        t1 = min(t0 + step, tiles)
        r0, r1 = t0 * TILE, min(t1 * TILE, n)
        rows = (t1 - t0) * TILE
        packed = q_rows(r0, r1)
        q = np.zeros((rows, k), np.uint8)
        q[:r1 - r0, 0::2] = packed & 0x0F
        q[:r1 - r0, 1::2] = packed >> 4
        qt = q.reshape(t1 - t0, TILE, k // QUAD, QUAD).transpose(0, 2, 1, 3)  # [T', K/4, 16, 4]
        np.bitwise_or(qt[:, :, :TILE // 2], qt[:, :, TILE // 2:] << 4, out=nib[t0:t1])
        codes, units = int4_scale_codes(s_rows(r0, r1))
        u = np.zeros(rows, np.float32)
        u[:r1 - r0] = units
        sc[t0:t1, :UNIT_ROWS] = u.reshape(t1 - t0, TILE).view(np.uint8).reshape(t1 - t0, UNIT_ROWS, TILE)
        c = np.zeros((rows, groups), np.uint8)
        c[:r1 - r0] = codes
        sc[t0:t1, UNIT_ROWS:] = c.reshape(t1 - t0, TILE, groups).transpose(0, 2, 1)
        z = np.zeros((rows, groups), np.uint8)
        z[:r1 - r0] = z_rows(r0, r1)
        z = z.reshape(t1 - t0, TILE, groups).transpose(0, 2, 1)  # [T', K/G, 16]
        zp[t0:t1] = z[..., :TILE // 2] | (z[..., TILE // 2:] << 4)
    return nib, sc, zp
