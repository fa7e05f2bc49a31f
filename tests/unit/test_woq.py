"""Weight-only quantization without a model: quantizers, both kernel paths, the swap, ISA detection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.quant import kernels
from app.quant.isa import CpuIsa, cpu_flags, detect_isa
from app.quant.woq import (
    CROSSOVER_M,
    KERNEL_ENV,
    NEVER,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    TiledInt4Linear,
    TiedInt8Embedding,
    TiledInt8Linear,
    crossover_rows,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    pick_group_size,
    probe_int4_layout,
    quantize_int4,
    quantize_int8,
    quantize_model,
    resolve_kernel,
    unpack_int4,
)

AVX2 = CpuIsa(avx2=True, avx512f=False, avx512_bf16=False, amx_tile=False, amx_bf16=False,
              torch_capability="AVX2")
AMX = CpuIsa(avx2=True, avx512f=True, avx512_bf16=True, amx_tile=True, amx_bf16=True,
             torch_capability="AVX512")
ROWS = (1, 8, 64, 300)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen(seed)) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen(seed + 1)))
    return lin


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- quantizers


def test_int8_quant_dequant_error_bound():
    w = torch.randn(96, 160, generator=gen(1)) * torch.logspace(-3, 1, 96)[:, None]  # very different rows
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    assert torch.equal(s.to(torch.bfloat16).float(), s)  # bf16-exact scales
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= 0.5 * s[:, None] * 1.01 + 1e-9).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quant_dequant_error_bound(group):
    w = torch.randn(64, 256, generator=gen(2)) + torch.linspace(-3, 3, 64)[:, None]  # offset rows
    q, s, z = quantize_int4(w, group, clip_ratios=(1.0,))  # plain min/max range
    assert q.min() >= 0 and q.max() <= 15 and s.shape == z.shape == (64, 256 // group)
    err = (dequantize_int4(q, s, z, group) - w).abs().view(64, -1, group)
    wmax = w.abs().view(64, -1, group).amax(-1, keepdim=True)
    # half a step, plus what the bf16 rounding of the scale moves the range's far end (<= 2^-8 of it)
    assert (err <= 0.5 * s[..., None] * 1.01 + wmax / 256).all()
    # the default range search keeps, per group, the least squared error of the ratios it tries
    group_sq_err = (err ** 2).sum(-1)
    qc, sc, zc = quantize_int4(w, group)
    clipped_sq_err = ((dequantize_int4(qc, sc, zc, group) - w).view(64, -1, group) ** 2).sum(-1)
    assert (clipped_sq_err <= group_sq_err * (1 + 1e-5)).all()
    assert clipped_sq_err.sum() < 0.95 * group_sq_err.sum()  # and it pays on Gaussian weights


@pytest.mark.parametrize("value", [0.25, -0.3, 1e-3])
def test_int4_constant_group_is_exact_enough(value):
    """A constant group (all positive or all negative: the range is widened to hold 0, the zero point an
    integer) is represented within the bf16 rounding of its scale."""
    w = torch.full((16, 64), value)
    q, s, z = quantize_int4(w, 32)
    assert z.dtype == torch.uint8 and int(z.max()) <= 15
    assert torch.allclose(dequantize_int4(q, s, z, 32), w, rtol=2 ** -8, atol=0)


def test_group_size_selection():
    assert pick_group_size(4544) == 32  # falcon-7b hidden: 142 * 32
    assert pick_group_size(2048) == 32
    assert pick_group_size(64) == 32  # the demo models
    assert pick_group_size(96) == 32
    assert pick_group_size(48) is None  # no valid group: caller falls back to int8
    assert pick_group_size(176) is None  # demo-llama's intermediate size: 11 * 16
    assert pick_group_size(4544, 64) == 64
    assert pick_group_size(4544, 32) == 32
    assert pick_group_size(4544, 128) is None
    with pytest.raises(ValueError):
        pick_group_size(64, 16)  # the kernel accepts only 32/64/128/256


def test_int4_packing_convention_matches_aten_kernel():
    """_weight_int4pack_mm_for_cpu computes x @ ((q - 8) * scale + zero)^T with our layout, so our integer
    zero point z is its float zero (8 - z) * scale."""
    n, k, g = 64, 128, 32
    q = torch.randint(0, 16, (n, k), generator=gen(3), dtype=torch.int32)
    s = torch.rand(n, k // g, generator=gen(4)).to(torch.bfloat16).float() + 0.5
    z = torch.randint(0, 16, (n, k // g), generator=gen(5), dtype=torch.uint8)
    sz = torch.stack((s, (8.0 - z.float()) * s), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    x = torch.randn(5, k, generator=gen(6)).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(x, pack_int4(q), g, sz).float()
    ref = x.float() @ dequantize_int4(q, s, z, g).t()
    assert rel_err(y, ref) < 1e-2


def test_int4_layout_probe_and_unpack():
    layout = probe_int4_layout()
    assert layout is not None, "ATen's int4 packing layout is not one we know: int4 dequant path is off"
    q = torch.randint(0, 16, (256, 96), generator=gen(7), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(q), layout).to(torch.int32), q)


# --------------------------------------------------------------------------- modules vs fp32 reference


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", ["packed", "dequant"])
def test_int8_linear_matches_reference(path, bias):
    lin = make_linear(192, 100, bias)
    mod = Int8Linear.from_linear(lin, NEVER if path == "packed" else 0)
    w = mod.dequantize()
    for m in ROWS:
        x = torch.randn(m, 192, generator=gen(m))
        y = mod(x)
        assert y.shape == (m, 100) and y.dtype == torch.float32
        ref = F.linear(x, w, lin.bias)
        # packed: bf16 activations and bf16 output; dequant: plain fp32
        assert rel_err(y, ref) < (1e-2 if path == "packed" else 1e-5), (path, m)
        assert rel_err(y, lin(x)) < 2e-2  # and close to the unquantized layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", ["packed", "dequant"])
@pytest.mark.parametrize("n,k", [(100, 64), (128, 4544)])  # N not a multiple of 16; falcon-7b's K
def test_int4_linear_matches_reference(path, bias, n, k):
    lin = make_linear(k, n, bias)
    group = pick_group_size(k)
    mod = Int4Linear.from_linear(lin, group, NEVER if path == "packed" else 0, probe_int4_layout())
    w = mod.dequantize()
    assert w.shape == (n, k)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen(m))
        y = mod(x)
        assert y.shape == (m, n) and y.dtype == torch.float32
        ref = F.linear(x, w, lin.bias)
        assert rel_err(y, ref) < (1e-2 if path == "packed" else 1e-5), (path, m)
        assert rel_err(y, lin(x)) < 0.15  # int4 of Gaussian weights: ~8% relative error


def test_auto_switches_path_at_crossover():
    lin = make_linear(64, 32, True)
    mod = Int8Linear.from_linear(lin, 16)
    w = mod.dequantize()
    x = torch.randn(16, 64, generator=gen(9))
    assert rel_err(mod(x), F.linear(x, w, lin.bias)) < 1e-5  # M=16 >= 16: dequant, exact fp32
    assert 1e-5 < rel_err(mod(x[:15]), F.linear(x[:15], w, lin.bias)) < 1e-2  # bf16 packed kernel


def test_leading_dims_kept():
    mod = Int8Linear.from_linear(make_linear(64, 48, False), NEVER)
    assert mod(torch.randn(2, 3, 64)).shape == (2, 3, 48)


# --------------------------------------------------------------------------- kernel choice


def test_kernel_override_env(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert resolve_kernel() == "auto"
    monkeypatch.setenv(KERNEL_ENV, "dequant")
    assert resolve_kernel() == "dequant"
    assert resolve_kernel("packed") == "packed"  # an explicit argument wins
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match=KERNEL_ENV):
        resolve_kernel()


def test_crossover_by_isa():
    assert crossover_rows("int8", AVX2, "auto") == CROSSOVER_M["int8"]
    assert crossover_rows("int4", AVX2, "auto") == CROSSOVER_M["int4"]
    assert crossover_rows("int8", AMX, "auto") == NEVER  # native bf16: packed kernel for every M
    assert crossover_rows("int8", AVX2, "packed") == NEVER
    assert crossover_rows("int4", AMX, "dequant") == 0


def test_env_override_reaches_modules(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "packed")
    model = nn.Sequential(make_linear(64, 64, False))
    report = quantize_model(model, "int8", isa=AVX2)
    assert model[0].crossover_m == NEVER and "forced kernel=packed" in report.kernel


# --------------------------------------------------------------------------- the swap


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 64)
        self.layers = nn.ModuleList(nn.ModuleDict({"qkv_proj": nn.Linear(64, 96), "o_proj": nn.Linear(64, 64),
                                                   "norm": nn.LayerNorm(64)}) for _ in range(2))
        self.odd = nn.Linear(48, 64, bias=False)  # K=48: no int4 group size
        self.lm_head = nn.Linear(64, 50, bias=False)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_swaps_exactly_the_linears(mode, monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    model = Toy()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp32_bytes = sum(m.weight.numel() * 4 + (m.bias.numel() * 4 if m.bias is not None else 0)
                     for m in linears.values())
    report = quantize_model(model, mode, isa=AVX2)
    assert report.num_swapped == len(linears) == 6
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.layers[0]["norm"], nn.LayerNorm) and isinstance(model.embed_tokens, Int8Embedding)
    assert report.embedding == "int8"
    assert report.bytes_before == fp32_bytes and 0 < report.bytes_after < fp32_bytes / 2
    own = kernels.available()  # Lanner's own kernels where they build
    int8_kind = TiledInt8Linear if own else Int8Linear
    kind = (TiledInt4Linear if own else Int4Linear) if mode == "int4" else int8_kind
    assert isinstance(model.lm_head, int8_kind) and isinstance(model.layers[1]["qkv_proj"], kind)
    assert report.head == "int8"  # int4 mode keeps the head at int8 by default
    assert isinstance(model.odd, int8_kind)  # int4 falls back for K=48, and says so
    assert bool(report.fallbacks) == (mode == "int4")
    assert all(f.startswith("odd:") for f in report.fallbacks)
    expected = {m: f"{m}: lanner {m} tiles (int dot, q8 act) for all M" if own else f"M<{CROSSOVER_M[m]}"
                for m in ("int8", "int4")}
    assert expected["int8"] in report.kernel and "AVX2" in report.isa
    assert (expected["int4"] in report.kernel) == (mode == "int4")
    assert report.summary().startswith(f"quantize={mode}: 6 Linear modules")


def test_int4_head_can_be_int4():
    model = Toy()
    report = quantize_model(model, "int4", int4_head="int4", isa=AVX2)
    assert isinstance(model.lm_head, (Int4Linear, TiledInt4Linear)) and report.head == "int4"


@pytest.mark.parametrize("kernel", ["auto", "packed"])  # Lanner's tiles (where built) / ATen's Int8Linear
def test_int8_embedding_and_the_tied_heads_rows(kernel, monkeypatch):
    """The token embedding becomes int8 per row; a tied model's embedding reads the int8 head's rows (both
    head layouts), which are the same numbers, without a second table."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    untied, tied = Toy(), Toy()
    tied.lm_head.weight = tied.embed_tokens.weight
    table = tied.embed_tokens.weight.detach().clone()
    untied_table = untied.embed_tokens.weight.detach().clone()
    quantize_model(untied, "int8", isa=AVX2)
    report = quantize_model(tied, "int8", isa=AVX2)
    assert isinstance(untied.embed_tokens, Int8Embedding) and isinstance(tied.embed_tokens, TiedInt8Embedding)
    assert report.embedding == "int8 (the head's rows)" and not list(tied.embed_tokens.buffers())
    q, s = quantize_int8(table)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])  # any shape of ids, repeats, the last row
    want = (q.float() * s[:, None])[ids]
    assert torch.equal(tied.embed_tokens(ids), want)
    assert torch.equal(tied.lm_head.dequantize()[ids], want)
    q, s = quantize_int8(untied_table)
    assert torch.equal(untied.embed_tokens(ids), (q.float() * s[:, None])[ids])
    assert untied.embed_tokens(ids).shape == (2, 3, 64)
    for model in (tied, untied):  # an id past the vocabulary (50; the head's last tile pads to 64) is refused
        with pytest.raises(IndexError):
            model.embed_tokens(torch.tensor([50]))


def test_quantize_model_head_optional_and_none_is_noop():
    model = Toy()
    assert quantize_model(model, "none").num_swapped == 0
    assert isinstance(model.lm_head, nn.Linear)
    report = quantize_model(model, "int8", include_head=False, isa=AVX2)
    assert report.num_swapped == 5 and isinstance(model.lm_head, nn.Linear) and report.head == "fp32"
    with pytest.raises(ValueError):
        quantize_model(Toy(), "int3")  # type: ignore[arg-type]


def test_int8_bytes_are_about_a_quarter():
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    report = quantize_model(model, "int8", isa=AVX2)
    assert report.bytes_after / report.bytes_before < 0.26


def test_int4_bytes():
    """4 bits a weight plus a scale and a zero point per group: at most 5/32 of fp32 at group 32 (ATen's
    packing: a bf16 scale and a bf16 zero), 4.375/32 in Lanner's tiles (an 8-bit code and 4 bits); less at
    128."""
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    report = quantize_model(model, "int4", isa=AVX2)
    assert report.group_sizes == (32,) and report.bytes_after / report.bytes_before < 0.16
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    report = quantize_model(model, "int4", group_size=128, isa=AVX2)
    assert report.group_sizes == (128,) and report.bytes_after / report.bytes_before < 0.14


# --------------------------------------------------------------------------- isa


def test_isa_from_cpuinfo_flags():
    zen3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
    isa = detect_isa(zen3, "AVX2")
    assert isa.avx2 and not isa.avx512f and not isa.native_bf16
    spr = "flags : avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16\n"
    assert detect_isa(spr, "AVX512").native_bf16
    assert detect_isa(spr, "AVX512").avx512_vnni and not isa.avx512_vnni and not isa.avx_vnni
    assert "avx512_vnni" in detect_isa(spr, "AVX512").describe()
    assert not detect_isa(spr, "AVX2").native_bf16  # ATen told to dispatch AVX2 kernels
    assert cpu_flags("") == frozenset()
    assert detect_isa("", "AVX512").avx512f  # no cpuinfo: inferred from torch
    live = detect_isa()
    assert live.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert "native_bf16=" in live.describe()
