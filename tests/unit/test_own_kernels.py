"""Lanner's own WOQ kernels (app/quant/kernels.py, app/quant/csrc/woq_kernels.cpp): build, layouts, results
against a float64 reference of the same arithmetic (activations quantized per 32-block, exact integer dot
products), batch and thread invariance, and the fallback to ATen when they cannot build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.quant import kernels, tiles, woq
from app.quant.woq import (
    INT4_CLIP_RATIOS,
    KERNEL_ENV,
    Int4Linear,
    Int8Linear,
    TiledInt4Linear,
    TiledInt8Linear,
    build_module,
    dequantize_int4,
    kernel_plan,
    quantize_int4,
    quantize_weight,
    unpack_nibbles,
)

REPO = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler on this machine")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_int8(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-128, 128, (n, k), generator=gen(seed), dtype=torch.int8)
    return q, torch.rand(n, generator=gen(seed + 1)) + 0.01


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization, in torch: x [M, K] -> (xq [M, K] integers as float64, the
    per-element scale [M, K]); blocks of 32 along K, sx = max|x| / 127, xq = round(x / sx)."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    blocks = F.pad(x, (0, kp - k)).view(m, kp // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv)
    sx = (amax / 127).expand_as(xq)
    return xq.reshape(m, kp)[:, :k].double(), sx.reshape(m, kp)[:, :k].double()


def check_against_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y (the kernel's x @ w^T) against float64 of the quantized activations.  Allowed: fp32 rounding,
    plus one rounding step of one activation element at an exact tie (where torch and C++ may round a
    product computed in a different order differently): a step moves an output by sx * |w|."""
    xq, sx = quantized_activations(x)
    ref = (xq * sx) @ w.double().t()
    rounding = 1e-6 * ((xq * sx).abs() @ w.double().abs().t()) + 1e-7
    step = sx.max(dim=1, keepdim=True).values * w.double().abs().max(dim=1).values[None, :]
    err = (y.double() - ref).abs()
    assert (err <= rounding + 1.01 * step).all(), (err - rounding).max().item()
    assert (err <= rounding).float().mean().item() > 0.99  # ties are rare


@needs_kernels
def test_kernels_build_where_a_compiler_exists():
    """On a machine with a C++ compiler (CI, the Docker image) the kernels must build and load: a silent
    fallback to ATen would hide a broken build behind slower decode."""
    result = kernels.load()
    assert result.ok, result.detail
    assert Path(result.detail).is_file()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expected = ("avx512-vnni" if "avx512_vnni" in flags and "avx512vl" in flags else
                "avx-vnni" if "avx_vnni" in flags else "avx2" if "avx2" in flags and " fma" in flags else "scalar")
    assert result.isa == expected  # -march=native picked the best dot product this CPU has


def test_pack_layout_and_roundtrip():
    q, s = random_int8(37, 24)
    tiles, scales = kernels.pack_int8(q, s)
    assert tiles.shape == (3, 8, 16, 4) and scales.shape == (48,)  # K padded to 32: 8 quads
    q = q.clamp(min=-127)  # -128 is stored as -127
    assert torch.equal(tiles[1, 1, 3], q[19, 4:8]) and torch.equal(tiles[2, 5, :5, 0], q[32:, 20])
    assert not tiles[2, :, 5:].any() and not tiles[:, 6:].any() and not scales[37:].any()  # padding is zero
    assert torch.equal(kernels.unpack_int8(tiles, 37, 24), q) and tiles.min() >= -127


def test_packing_in_chunks_gives_the_same_tiles(monkeypatch):
    """Big matrices are repacked a few tiles at a time (bounded temporaries); the result must not change."""
    q, s = random_int8(90, 40, seed=8)
    qw = random_int4(90, 64, 32, seed=9)
    whole8, whole4 = kernels.pack_int8(q, s), kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    monkeypatch.setattr(tiles, "PACK_BYTES", 2 * kernels.TILE * 64)  # 6 tiles: chunks of 2, 2, 2 (K = 64)
    for a, b in zip((*whole8, *whole4), (*kernels.pack_int8(q, s), *kernels.pack_int4(qw.qweight, qw.scales,
                                                                                      qw.zeros))):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("n", [1, 15, 16, 17, 50, 100, 257])
@pytest.mark.parametrize("k", [1, 8, 64, 176, 4544])
def test_int8_mm_matches_float64_reference(n, k):
    q, s = random_int8(n, k, seed=n * 7 + k)
    tiles, scales = kernels.pack_int8(q, s)
    w = q.clamp(min=-127).double() * s.double()[:, None]
    for m in (1, 2, 3, 4, 5, 7, 13, 33):
        x = torch.randn(m, k, generator=gen(m))
        x[0, :3] = 0.0  # a zero block (k < 4) must not divide by zero
        y = kernels.int8_mm(x, tiles, scales, n)
        assert y.shape == (m, n) and y.dtype == torch.float32
        check_against_reference(y, x, w)
    assert not kernels.int8_mm(torch.zeros(2, k), tiles, scales, n).any()


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_rows_do_not_depend_on_batch_or_threads(mode):
    """A row's result is bit-identical alone, in any batch, and on 1 or 2 threads (activations are quantized
    per row; each output's float sums run in block order; threads split whole tiles), so greedy decode
    cannot change with the batch."""
    if mode == "int8":
        q, s = random_int8(300, 512, seed=3)
        args = (*kernels.pack_int8(q, s), 300)
        mm = kernels.int8_mm
    else:
        qw = random_int4(300, 512, 32, seed=3)
        args = (*kernels.pack_int4(qw.qweight, qw.scales, qw.zeros), 32, 300)
        mm = kernels.int4_mm
    x = torch.randn(13, 512, generator=gen(4))
    batch = mm(x, *args)
    for i in range(13):
        assert torch.equal(mm(x[i:i + 1].contiguous(), *args)[0], batch[i])
    for j in range(1, 13):
        assert torch.equal(mm(x[:j].contiguous(), *args), batch[:j])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = mm(x, *args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, batch)


def random_int4(n: int, k: int, group: int, seed: int = 0):
    """A portable int4 weight (app/quant/woq.py QuantizedWeight) of random values."""
    return quantize_weight(torch.randn(n, k, generator=gen(seed)) * 0.05, "int4", group)


def test_int4_pack_layout_and_roundtrip():
    qw = random_int4(37, 64, 32)
    nib, scales, zeros = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    assert nib.shape == (3, 16, 8, 4) and scales.shape == (3, 4 + 2, 16) and scales.dtype == torch.uint8
    assert zeros.shape == (3, 2, 8) and zeros.dtype == torch.uint8
    q = unpack_nibbles(qw.qweight)
    assert torch.equal(nib[1, 1, :, 1] & 0x0F, q[16:24, 5]) and torch.equal(nib[1, 1, :, 1] >> 4, q[24:32, 5])
    units = scales[:, :4].contiguous().view(torch.float32).reshape(48)  # each row's power of two, then codes
    assert torch.equal(torch.frexp(units[:37]).mantissa, torch.full((37,), 0.5)) and not units[37:].any()
    assert torch.equal(scales[2, 4 + 1, :5].float() * units[32:37], qw.scales[32:, 1])
    widest = scales[:, 4:].amax(dim=1).reshape(48)[:37]  # each row's widest group: 8 significant bits
    assert widest.min() >= 128 and scales[:, 4:].float().std() > 0
    assert torch.equal(zeros[1, 1] & 0x0F, qw.zeros[16:24, 1]) and torch.equal(zeros[1, 1] >> 4, qw.zeros[24:32, 1])
    assert torch.equal(zeros[2, 0, :5], qw.zeros[32:, 0]) and qw.zeros.float().std() > 0  # not all equal
    assert not nib[2, :, 5:].any() and not (nib[2] >> 4).any() and not scales[2, 4:, 5:].any()
    assert not zeros[2, :, 5:].any() and not (zeros[2] >> 4).any()
    q2, s2, z2 = kernels.unpack_int4(nib, scales, zeros, 37)
    assert torch.equal(q2, q) and torch.equal(s2, qw.scales.float()) and torch.equal(z2, qw.zeros)


def test_int4_scales_off_the_row_code_grid_are_refused():
    """The tiles store each int4 scale as an 8-bit code times the row's power of two.  Scales that are not
    on such a grid (another quantizer's, or Lanner's before checkpoint format 4: each its own bf16
    rounding) cannot be stored exactly, and packing them says so instead of rounding them."""
    qw = random_int4(20, 64, 32, seed=5)
    codes, units = kernels.int4_scale_codes(qw.scales)
    assert torch.equal(codes.float() * units[:, None], qw.scales) and codes.max(dim=1).values.min() >= 128
    w = torch.randn(20, 64, generator=gen(6)) * 0.05
    w[4] = 0.0  # an all-zero row still gets a unit
    _, ref_scales, _ = quantize_int4(w, 32, native=False)  # the Python search lands on the grid too
    ref_codes, ref_units = kernels.int4_scale_codes(ref_scales)
    assert ref_codes.min() >= 1 and torch.equal(ref_codes.float() * ref_units[:, None], ref_scales)
    bad = qw.scales.clone()
    bad[3, 1] = units[3] * 2.5  # bf16-exact, but half a unit off the grid
    assert float(torch.tensor(float(bad[3, 1])).to(torch.bfloat16)) == float(bad[3, 1])
    with pytest.raises(ValueError, match="quantize the weights again"):
        kernels.pack_int4(qw.qweight, bad, qw.zeros)


@pytest.mark.parametrize("mode,k,group", [("int8", 100, None), ("int4", 128, 32)])
@pytest.mark.parametrize("pieces", [[40], [32, 8, 8], [5, 21, 30], [70, 3, 50]])
def test_tile_packer_equals_packing_the_whole_quantized_matrix(monkeypatch, mode, k, group, pieces):
    """TilePacker (the loader's quantize-into-tiles path) gives bit for bit the tiles of quantize_weight +
    pack_int8 / pack_int4 of the whole matrix: blocks of rows within a piece (here 16 rows a block), fused
    pieces whose rows are not a whole number of tiles (their rows wait for the next block), a last tile
    padded with zeros."""
    monkeypatch.setattr(woq, "QUANTIZE_CHUNK_BYTES", 4 * k * 16)  # 16 rows a block
    g = gen(sum(pieces) + k)
    ws = [torch.randn(n, k, generator=g) * 0.05 for n in pieces]
    whole = woq.quantize_weight(torch.cat(ws), mode, group)
    want = (kernels.pack_int8(whole.qweight, whole.scales) if mode == "int8"
            else kernels.pack_int4(whole.qweight, whole.scales, whole.zeros))
    released = []
    packer = woq.TilePacker(mode, sum(pieces), k, group)
    for w in ws:
        packer.add(w, release=lambda rows: released.append(rows.shape[0]))
    got = packer.finish(bias=torch.ones(sum(pieces)))
    assert all(torch.equal(a, b) for a, b in zip(got.tiles, want)) and len(got.tiles) == len(want)
    assert (got.out_features, got.in_features, got.group_size) == (sum(pieces), k, group)
    assert sum(released) == sum(pieces) and max(released) <= 16  # every source block released once
    plan = kernel_plan(mode)
    if mode in plan.own:  # the module the loader builds from it
        module = build_module(got, plan)
        assert isinstance(module, TiledInt8Linear if mode == "int8" else TiledInt4Linear)
        assert torch.equal(module.dequantize(), whole.dequantize())
        assert torch.equal(module.bias, torch.ones(sum(pieces)))


def test_int4_scale_codes_in_row_chunks(monkeypatch):
    """int4_scale_codes goes PACK_BYTES of scales at a time (bounded temporaries at load): the codes and
    units of rows in later chunks are the same as in one pass, and an off-grid scale in a later chunk is
    still refused."""
    g = gen(7)
    units = torch.ldexp(torch.ones(50), torch.randint(-20, -5, (50,), generator=g))
    codes = torch.randint(1, 256, (50, 6), generator=g).to(torch.uint8)
    codes[:, 0] = 255  # each row's widest group: a code of 8 significant bits, as quantize_int4 makes
    scales = (codes.float() * units[:, None]).to(torch.bfloat16)
    monkeypatch.setattr(tiles, "PACK_BYTES", 4 * 6 * 8)  # 8 rows a chunk: 7 chunks
    got_codes, got_units = kernels.int4_scale_codes(scales)
    assert torch.equal(got_codes, codes) and torch.equal(got_units, units)
    bad = scales.clone()
    bad[45, 2] = units[45] * 2.5
    with pytest.raises(ValueError, match="quantize the weights again"):
        kernels.int4_scale_codes(bad)


@needs_kernels
@pytest.mark.parametrize("n", [1, 16, 17, 100])
@pytest.mark.parametrize("k,group", [(32, 32), (64, 32), (256, 64), (4544, 32), (512, 128), (512, 256)])
def test_int4_mm_matches_float64_reference(n, k, group):
    qw = random_int4(n, k, group, seed=n + k)
    packed = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    w = qw.dequantize().double()
    for m in (1, 2, 3, 5, 6, 7, 13):
        x = torch.randn(m, k, generator=gen(m))
        y = kernels.int4_mm(x, *packed, group, n)
        assert y.shape == (m, n) and y.dtype == torch.float32
        check_against_reference(y, x, w)


# The same source compiled for less capable CPUs (on this machine, so they can run here): the integer dot
# products differ (vpdpbusd, maddubs + sign trick, plain C++), the float operations and their order do not.
ISA_VARIANTS = {"avx2": ("-mno-avx512vnni", "-mno-avxvnni"), "scalar": ("-mno-avx2", "-mno-fma")}
VARIANT_CHILD = """
import sys, torch
torch.ops.load_library(sys.argv[1])
from app.quant import kernels
inputs = torch.load(sys.argv[2])
torch.save({"int8": kernels.int8_mm(*inputs["int8"]), "int4": kernels.int4_mm(*inputs["int4"]),
            "quantize": torch.ops.lanner.int4_quantize(*inputs["quantize"]), "isa": torch.ops.lanner.isa()},
           sys.argv[3])
"""


@needs_kernels
@pytest.mark.parametrize("variant", sorted(ISA_VARIANTS))
def test_isa_variants_give_bit_identical_results(variant, tmp_path, monkeypatch):
    """What an AVX2-only CPU (Zen 3) or a non-x86 one computes equals this machine's result bit for bit."""
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    library = kernels.build(kernels.compiler(), ISA_VARIANTS[variant])
    q, s = random_int8(100, 176, seed=11)  # K=176: padded to 192 inside
    qw = random_int4(100, 256, 64, seed=12)
    inputs = {"int8": (torch.randn(7, 176, generator=gen(13)), *kernels.pack_int8(q, s), 100),
              "int4": (torch.randn(7, 256, generator=gen(14)),
                       *kernels.pack_int4(qw.qweight, qw.scales, qw.zeros), 64, 100),
              "quantize": (torch.randn(64, 256, generator=gen(15)) * 0.02, 32, list(INT4_CLIP_RATIOS))}
    torch.save(inputs, tmp_path / "in.pt")
    done = subprocess.run([sys.executable, "-c", VARIANT_CHILD, str(library), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["isa"] == variant  # the variant really runs the other code path
    assert torch.equal(theirs["int8"], kernels.int8_mm(*inputs["int8"]))
    assert torch.equal(theirs["int4"], kernels.int4_mm(*inputs["int4"]))
    for a, b in zip(theirs["quantize"], torch.ops.lanner.int4_quantize(*inputs["quantize"])):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("shape,group", [((300, 2048), 32), ((40, 4544), 64), ((17, 512), 128), ((8, 256), 256)])
def test_int4_quantize_matches_the_python_reference(shape, group):
    """lanner::int4_quantize runs woq.quantize_int4's search in C++: the same grid, and the same choice in
    all but near-ties (its error sums run in another order), so the same quantization error."""
    w = torch.randn(*shape, generator=gen(21)) * 0.02
    w[0, :group] = 0.25  # a constant group, and a one-signed one
    w[1, :group] = -w[1, :group].abs()
    w[2, :group] = 0.0
    ours = quantize_int4(w, group, native=True)
    ref = quantize_int4(w, group, native=False)
    assert [t.dtype for t in ours] == [t.dtype for t in ref] and [t.shape for t in ours] == [t.shape for t in ref]
    same = (ours[1] == ref[1]) & (ours[2] == ref[2])
    assert same.float().mean() >= 0.998 and same[:3, 0].all()
    q_same = (ours[0] == ref[0]).view(shape[0], -1, group).all(-1)
    assert torch.equal(q_same | ~same, torch.ones_like(same))  # where the grid agrees, so does every q
    err = [(dequantize_int4(*t, group) - w).norm() / w.norm() for t in (ours, ref)]
    assert abs(err[0] - err[1]) <= 1e-4 * err[1]


def test_avx_vnni_variant_assembles(tmp_path, monkeypatch):
    """The AVX-VNNI code (Alder Lake and later client CPUs: VEX-encoded vpdpbusd, no AVX-512) cannot run on
    this machine, but it must compile and assemble: its inline asm needs the `{vex}` prefix."""
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    library = kernels.build(kernels.compiler(), ("-mno-avx512f", "-mavxvnni"))
    dump = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=False).stdout
    if dump:  # binutils present: every vpdpbusd is VEX (c4/c5 prefix), none needs AVX-512's EVEX
        lines = [line for line in dump.splitlines() if "vpdpbusd" in line]
        assert lines and all("{vex}" in line for line in lines), lines[:3]


@needs_kernels
def test_non_finite_activations_give_nan_rows():
    """inf / NaN in a row make that row's outputs NaN (like fp32 matmul), never garbage, and leave the other
    rows alone."""
    q, s = random_int8(40, 64, seed=15)
    qw = random_int4(40, 64, 32, seed=16)
    x = torch.randn(3, 64, generator=gen(17))
    clean = (kernels.int8_mm(x, *kernels.pack_int8(q, s), 40),
             kernels.int4_mm(x, *kernels.pack_int4(qw.qweight, qw.scales, qw.zeros), 32, 40))
    x[0, 5], x[2, 40] = float("nan"), float("inf")
    dirty = (kernels.int8_mm(x, *kernels.pack_int8(q, s), 40),
             kernels.int4_mm(x, *kernels.pack_int4(qw.qweight, qw.scales, qw.zeros), 32, 40))
    for y, y0 in zip(dirty, clean):
        assert y[0].isnan().all() and y[2].isnan().all()
        assert torch.equal(y[1], y0[1])


@needs_kernels
def test_int8_mm_rejects_bad_inputs():
    q, s = random_int8(32, 64)
    tiles, scales = kernels.pack_int8(q, s)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.int8_mm(torch.randn(2, 96), tiles, scales, 32)
    with pytest.raises(RuntimeError, match="fp32"):
        kernels.int8_mm(torch.randn(2, 64, dtype=torch.float64), tiles, scales, 32)
    with pytest.raises(RuntimeError, match="n does not match"):
        kernels.int8_mm(torch.randn(2, 64), tiles, scales, 40)
    qw = random_int4(32, 64, 32)
    nib, scales, zeros = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    with pytest.raises(RuntimeError, match="group size must be a multiple of 32"):
        kernels.int4_mm(torch.randn(2, 64), nib, scales, zeros, 48, 32)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.int4_mm(torch.randn(2, 64), nib, scales, zeros, 64, 32)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.int4_mm(torch.randn(2, 64), nib, scales, zeros[:, :1].contiguous(), 32, 32)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiled_module_matches_dequantized_reference(mode, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 100, bias=bias)
    qw = quantize_weight(lin.weight.detach(), mode, 64 if mode == "int4" else None, bias=lin.bias)
    mod = (TiledInt8Linear if mode == "int8" else TiledInt4Linear).from_quantized(qw)
    w = qw.dequantize()
    assert torch.equal(mod.dequantize(), w)
    for lead in ((1,), (8,), (300,), (2, 3)):
        x = torch.randn(*lead, 192, generator=gen(len(lead)))
        y = mod(x)
        assert y.shape == (*lead, 100)
        flat = x.reshape(-1, 192)
        check_against_reference(y.reshape(-1, 100) - (0 if lin.bias is None else lin.bias.detach()), flat, w)
        # and the activation quantization costs little against the layer in fp32
        ref = F.linear(x, w, lin.bias)
        assert (y - ref).norm() / ref.norm() < 0.01


@needs_kernels
def test_plan_uses_own_kernels(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    plan = kernel_plan("int4")
    assert plan.own == {"int8", "int4"} and plan.layout is None  # ATen's int4 layout is not needed
    assert isinstance(build_module(quantize_weight(torch.randn(32, 64), "int8"), plan), TiledInt8Linear)
    assert isinstance(build_module(random_int4(32, 64, 32), plan), TiledInt4Linear)
    assert plan.describe(["int8", "int4"]) == ("int4: lanner int4 tiles (int dot, q8 act) for all M; "
                                               "int8: lanner int8 tiles (int dot, q8 act) for all M; "
                                               f"lanner kernels: {kernels.load().isa} dot products")
    forced = kernel_plan("int4", "packed")  # ATen's kernels stay selectable
    assert not forced.own
    assert isinstance(build_module(quantize_weight(torch.randn(32, 64), "int8"), forced), Int8Linear)
    assert isinstance(build_module(random_int4(32, 64, 32), forced), Int4Linear)


def test_unavailable_kernels_fall_back_to_aten(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    result = kernels.load.__wrapped__()  # the uncached body: what a machine without a compiler gets
    assert not result.ok and "no C++ compiler" in result.detail
    monkeypatch.setattr(kernels, "load", lambda: result)
    plan = kernel_plan("int8")
    assert not plan.own and "own kernels unavailable (no C++ compiler" in plan.describe(["int8"])
    assert isinstance(build_module(quantize_weight(torch.randn(32, 64), "int8"), plan), Int8Linear)
    with pytest.raises(ValueError, match="kernel=lanner"):  # asked for by name: an error, not a fallback
        kernel_plan("int8", "lanner")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENABLE_ENV, "0")
    result = kernels.load.__wrapped__()
    assert not result.ok and kernels.ENABLE_ENV in result.detail


@needs_kernels
def test_fresh_build_is_cached(tmp_path):
    """`python -m app.quant.kernels` (what the Dockerfile runs) compiles into an empty cache, then the
    next process finds the library there without compiling."""
    env = {**os.environ, kernels.CACHE_ENV: str(tmp_path)}
    env.pop(kernels.ENABLE_ENV, None)
    first = subprocess.run([sys.executable, "-m", "app.quant.kernels"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "building Lanner's kernels" in first.stderr and first.stdout.startswith(f"ok: {tmp_path}")
    assert first.stdout.strip().endswith(f"({kernels.load().isa})")
    built = list(tmp_path.glob("*/lanner_woq_kernels.so"))
    assert len(built) == 1
    second = subprocess.run([sys.executable, "-m", "app.quant.kernels"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "building" not in second.stderr
    assert second.stdout.strip() == f"ok: {built[0]} ({kernels.load().isa})"
