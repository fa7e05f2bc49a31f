"""Lanner's own WOQ kernels (app/quant/kernels.py, app/quant/csrc/woq_kernels.cpp): build, layout, exactness
against a float64 reference, batch and thread invariance, and the fallback to ATen when they cannot build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.quant import kernels
from app.quant.woq import (
    KERNEL_ENV,
    Int4Linear,
    Int8Linear,
    TiledInt4Linear,
    TiledInt8Linear,
    build_module,
    kernel_plan,
    quantize_weight,
    unpack_nibbles,
)

REPO = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_int8(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-128, 128, (n, k), generator=gen(seed), dtype=torch.int8)
    return q, torch.rand(n, generator=gen(seed + 1)) + 0.01


@needs_kernels
def test_kernels_build_where_a_compiler_exists():
    """On a machine with a C++ compiler (CI, the Docker image) the kernels must build and load: a silent
    fallback to ATen would hide a broken build behind slower decode."""
    result = kernels.load()
    assert result.ok, result.detail
    assert Path(result.detail).is_file()


def test_pack_layout_and_roundtrip():
    q, s = random_int8(37, 24)
    tiles, scales = kernels.pack_int8(q, s)
    assert tiles.shape == (3, 24, 16) and scales.shape == (48,)
    assert torch.equal(tiles[1, 5], q[16:32, 5]) and torch.equal(tiles[2, :, :5], q[32:].t())
    assert not tiles[2, :, 5:].any() and not scales[37:].any()  # padding rows are zero
    assert torch.equal(kernels.unpack_int8(tiles, 37), q)


@needs_kernels
@pytest.mark.parametrize("n", [1, 15, 16, 17, 50, 100, 257])
@pytest.mark.parametrize("k", [1, 8, 64, 4544])
def test_int8_mm_matches_float64_reference(n, k):
    q, s = random_int8(n, k, seed=n * 7 + k)
    tiles, scales = kernels.pack_int8(q, s)
    for m in (1, 2, 3, 4, 5, 6, 7, 13, 33):
        x = torch.randn(m, k, generator=gen(m))
        y = kernels.int8_mm(x, tiles, scales, n)
        ref = (x.double() @ q.double().t()) * s.double()
        assert y.shape == (m, n) and y.dtype == torch.float32
        # fp32 accumulation over k terms: error grows like sqrt(k) * eps * |x| |q|
        bound = 1e-6 * (x.double().abs() @ q.double().abs().t() * s.double()).max().item() + 1e-6
        assert (y.double() - ref).abs().max().item() < bound, (m, n, k)


@needs_kernels
def test_rows_do_not_depend_on_batch_or_threads():
    """A row's result is bit-identical alone, in any batch, and on 1 or 2 threads (each output lane sums
    in k order; threads split whole tiles), so greedy decode cannot change with the batch."""
    q, s = random_int8(300, 512, seed=3)
    tiles, scales = kernels.pack_int8(q, s)
    x = torch.randn(13, 512, generator=gen(4))
    batch = kernels.int8_mm(x, tiles, scales, 300)
    for i in range(13):
        assert torch.equal(kernels.int8_mm(x[i:i + 1].contiguous(), tiles, scales, 300)[0], batch[i])
    for j in range(1, 13):
        assert torch.equal(kernels.int8_mm(x[:j].contiguous(), tiles, scales, 300), batch[:j])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernels.int8_mm(x, tiles, scales, 300)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, batch)


def random_int4(n: int, k: int, group: int, seed: int = 0):
    """A portable int4 weight (app/quant/woq.py QuantizedWeight) of random values."""
    return quantize_weight(torch.randn(n, k, generator=gen(seed)) * 0.05, "int4", group)


def test_int4_pack_layout_and_roundtrip():
    qw = random_int4(37, 64, 32)
    nib, sz = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    assert nib.shape == (3, 64, 8) and sz.shape == (3, 2, 2, 16) and sz.dtype == torch.bfloat16
    q = unpack_nibbles(qw.qweight)
    assert torch.equal(nib[1, 5] & 0x0F, q[16:24, 5]) and torch.equal(nib[1, 5] >> 4, q[24:32, 5])
    assert torch.equal(sz[2, 1, 0, :5].float(), qw.scales[32:, 1]) and torch.equal(sz[2, 1, 1, :5].float(), qw.zeros[32:, 1])
    assert not nib[2, :, 5:8].any() and not (nib[2] >> 4).any() and not sz[2, :, :, 5:].float().any()
    q2, s2, z2 = kernels.unpack_int4(nib, sz, 37)
    assert torch.equal(q2, q) and torch.equal(s2, qw.scales.float()) and torch.equal(z2, qw.zeros.float())


@needs_kernels
@pytest.mark.parametrize("n", [1, 16, 17, 100])
@pytest.mark.parametrize("k,group", [(32, 32), (64, 32), (256, 64), (4544, 32), (512, 128), (512, 256)])
def test_int4_mm_matches_float64_reference(n, k, group):
    qw = random_int4(n, k, group, seed=n + k)
    nib, sz = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    w = qw.dequantize().double()
    for m in (1, 2, 3, 5, 6, 7, 13):
        x = torch.randn(m, k, generator=gen(m))
        y = kernels.int4_mm(x, nib, sz, group, n)
        ref = x.double() @ w.t()
        assert y.shape == (m, n) and y.dtype == torch.float32
        bound = 2e-6 * (x.double().abs() @ w.abs().t()).max().item() + 1e-6
        assert (y.double() - ref).abs().max().item() < bound, (m, n, k, group)


@needs_kernels
def test_int4_batch_rows_do_not_depend_on_the_batch():
    """Rows of a batch (M >= 2) are bit-identical whatever the batch and thread count; a single row
    (decode of one stream) takes the group-accumulator path, equal to ~1e-6."""
    qw = random_int4(300, 512, 32, seed=5)
    nib, sz = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    x = torch.randn(13, 512, generator=gen(6))
    batch = kernels.int4_mm(x, nib, sz, 32, 300)
    for j in range(2, 13):
        assert torch.equal(kernels.int4_mm(x[:j].contiguous(), nib, sz, 32, 300), batch[:j])
        assert torch.equal(kernels.int4_mm(x[j - 2:j].contiguous(), nib, sz, 32, 300), batch[j - 2:j])
    single = kernels.int4_mm(x[:1].contiguous(), nib, sz, 32, 300)
    torch.testing.assert_close(single[0], batch[0], rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.int4_mm(x, nib, sz, 32, 300), batch)
        assert torch.equal(kernels.int4_mm(x[:1].contiguous(), nib, sz, 32, 300), single)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_int8_mm_rejects_bad_inputs():
    q, s = random_int8(32, 64)
    tiles, scales = kernels.pack_int8(q, s)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.int8_mm(torch.randn(2, 63), tiles, scales, 32)
    with pytest.raises(RuntimeError, match="fp32"):
        kernels.int8_mm(torch.randn(2, 64, dtype=torch.float64), tiles, scales, 32)
    with pytest.raises(RuntimeError, match="n does not match"):
        kernels.int8_mm(torch.randn(2, 64), tiles, scales, 40)
    qw = random_int4(32, 64, 32)
    nib, sz = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
    with pytest.raises(RuntimeError, match="group size must divide"):
        kernels.int4_mm(torch.randn(2, 64), nib, sz, 48, 32)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.int4_mm(torch.randn(2, 64), nib, sz, 64, 32)


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
        torch.testing.assert_close(y, F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_plan_uses_own_kernels(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    plan = kernel_plan("int4")
    assert plan.own == {"int8", "int4"} and plan.layout is None  # ATen's int4 layout is not needed
    assert isinstance(build_module(quantize_weight(torch.randn(32, 64), "int8"), plan), TiledInt8Linear)
    assert isinstance(build_module(random_int4(32, 64, 32), plan), TiledInt4Linear)
    assert plan.describe(["int8", "int4"]) == ("int4: lanner int4 tiles (fp32 act) for all M; "
                                               "int8: lanner int8 tiles (fp32 act) for all M")
    forced = kernel_plan("int4", "packed")  # ATen's kernels stay selectable
    assert not forced.own
    assert isinstance(build_module(quantize_weight(torch.randn(32, 64), "int8"), forced), Int8Linear)
    assert isinstance(build_module(random_int4(32, 64, 32), forced), Int4Linear)


def test_unavailable_kernels_fall_back_to_aten(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
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
    assert "building Lanner's WOQ kernels" in first.stderr and first.stdout.startswith(f"ok: {tmp_path}")
    built = list(tmp_path.glob("*/lanner_woq_kernels.so"))
    assert len(built) == 1
    second = subprocess.run([sys.executable, "-m", "app.quant.kernels"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "building" not in second.stderr
    assert second.stdout.strip() == f"ok: {built[0]}"
