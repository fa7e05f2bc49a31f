"""Weight-only quantization (WOQ): int8 / int4 weights, fp32 activations, one module swap.

Algorithm
---------
`quantize_model(model, mode)` replaces every `nn.Linear` (the output head too, unless
`include_head=False`) by an `Int8Linear` or `Int4Linear`, one module at a time so each fp32 weight can be
freed as soon as its quantized copy exists. The mode comes from configuration (`ModelSpec.quantize`),
never from a file name; "none" is a no-op.  Which library runs the quantized layers is the model's
`woq_backend` (`ModelSpec.woq_backend`): "native" (default) is this module's Int8Linear / Int4Linear;
"torchao" and "ipex" (optional, imported only when chosen) build their own modules from the same portable
`QuantizedWeight` through `build_module` (app/quant/backends, docs/quantization.md).

* int8: symmetric, per output channel.  w[n, k] ~= q[n, k] * s[n],  q in [-128, 127],
  s[n] = max_k |w[n, k]| / 127 rounded to bf16 (the packed kernel takes bf16 scales with bf16
  activations; quantizing against the rounded scale keeps both kernel paths exact w.r.t. each other).
* int4: asymmetric, per group of G consecutive input features (G = 32 unless given; 64/128/256 are
  accepted): w[n, k] ~= (q[n, k] - z[n, g]) * s[n, g],  q and the zero point z integers in [0, 15],
  g = k // G: 4 bits per weight, plus an 8-bit scale code and a 4-bit zero per group (4.375 bits at
  G = 32, 4.19 at G = 64; llama.cpp's Q4_0 is 4.5).  Scales are coded per row: s[n, g] = c[n, g] * 2^e[n]
  with c an integer 1..255 and e the smallest exponent at which the row's widest group (its unclipped
  step) fits 255 (so every scale is also bf16-exact, which ATen's, torchao's and IPEX's kernels take as
  is); Lanner's tiles store c and 2^e, 12 bits per group instead of bf16's 16 + 4.  Per group, the range
  [min(w, 0), max(w, 0)] is shrunk by r about its middle; z is where 0 falls on 16 levels spanning it
  (rounded), s the step nearest to reaching both ends from z on the row's code grid; r in
  INT4_CLIP_RATIOS chosen for the least squared error (clipping a few outliers buys a finer step for the
  rest).  (Until checkpoint format 4 each scale was a bf16 rounding of its own: 4.625 bits per weight at
  G = 32, and the same 7.74% relative error on a Gaussian matrix; docs/quantization.md, *Scale codes*.
  Until format 2 the zero was a bf16 float, 5 bits per weight at G = 32: the integer zero raises a
  Gaussian matrix's error from 7.59% to 7.74%, the tiny models' mean logit cosine drops by <= 0.002, and a
  decode step reads 7.6% fewer bytes of layers.)
  ATen's `_weight_int4pack_mm_for_cpu` maps the nibble to q - 8, then `* scale + zero` (torch 2.13
  aten/src/ATen/native/cpu/int4mm_kernel.cpp), so its zero is (8 - z) * s, checked numerically in
  tests/unit/test_woq.py.  In int4 mode the output head is
  int8 by default (llama.cpp likewise keeps a Q4_0 model's output matrix at 6 bits): on the tiny test
  models that alone lifted logit cosine similarity by ~0.003.  Group 32 (was: the largest of 128/64/32
  dividing K) cuts the relative error of a Gaussian matrix from 8.6% (G=64) / 9.6% (G=128) to 7.6% and
  lifted the tiny models' mean logit cosine by 0.002-0.012 (the 1.1B shape: 0.825 -> 0.868) for 18% more
  int4 bytes (scales/zeros) and no measurable kernel time (0.83 ms at M=1, 2048x5632, G=32 and 128).  A
  least-squares refit of scale/zero after rounding, with 3 range shifts, cut the error a further 7.5% but
  made quantizing 7.7x slower for +0.001-0.002 of cosine: not used.  What int4 reaches on random-weight
  models, and why, is in tests/model/test_woq_accuracy.py.
  Weights go through `_convert_weight_to_int4pack_for_cpu(q_int32 [N, K], 1)` -> uint8 [N, K/2];
  scales/zeros are stored as one bf16 tensor [K/G, N, 2].  Kernel constraints found in torch 2.13: N a
  multiple of 16, G in {32, 64, 128, 256}, K a multiple of G.  We pad N to a multiple of 64 with zero rows
  (and slice the output) and fall back to int8 for a layer whose K has no valid group size.

Kernels.  By default ("auto", or "lanner" by name) the layers run Lanner's own kernels
(app/quant/kernels.py, app/quant/csrc/woq_kernels.cpp) for every M: `TiledInt8Linear` / `TiledInt4Linear`
hold the weights in tiles of 16 output rows with k in quads, built at load from the portable form, and
multiply them with integer dot products (VNNI or AVX2) against activations quantized per row in blocks of
32 (llama.cpp's Q8 activation scheme; int8 logits stay within the accuracy bounds of the tests).  They are
compiled for the running CPU on first use; where that is impossible (no C++ compiler,
LANNER_OWN_KERNELS=0) the model uses ATen's kernels below and the report says why.  Measured (2-core EPYC,
AVX-512 VNNI, bench/results/decode/, all layers in one C++ call, both engines loaded and decoding in
turns): the TinyLlama-1.1B shape decodes int8 at 1.13-1.38x and int4 at 1.09-1.13x llama.cpp's Q8_0 / Q4_0
on the same weights (ATen's kernels: 0.6x / 0.5x), and prefills 128 tokens in 0.7 s (int8) against
llama.cpp's 1.5-2.1 s;
per-call numbers at OWN_KERNEL_MODES.

ATen's kernels ("packed", "dequant", and "auto" without own kernels), per call, by the number of activation
rows M (tokens in the step):
* "packed": `_weight_int8pack_mm(x_bf16, q, s_bf16)` / `_weight_int4pack_mm_for_cpu(x_bf16, ...)`.
  Reads the small weights once: the decode path (memory-bound, M small).  Activations are cast to bf16
  only at the matmul input and the output back to fp32: with fp32 activations the int8 kernel takes a
  slow path (5.6 ms vs 0.44 ms at M=1 on 2048->5632, Zen 3).
* "dequant": dequantize a chunk of output rows to fp32 (<= DEQUANT_CHUNK_BYTES at a time) and run the
  fp32 sgemm on it (int8: scales applied to the output columns instead of the weights; int4: unpacked
  straight into W^T so the per-group scale broadcast runs along contiguous memory).  On AVX2 the packed
  kernels are compute-bound (about 0.26 ms per row at 2048x5632, they emulate bf16 arithmetic) while
  sgemm gains from large M, so prefill chunks of many rows are faster through dequant+sgemm.
  Measured per call, 2048->5632 (bench/results/kernels.md):
      M      fp32    int8 packed  int8 dequant  int4 packed  int4 dequant
      1      1.73      0.47          3.9          0.84          8.7     ms
      32     9.0       8.5           9.2          8.6          14.6
      128   21.9      33.5          21.4         34.4          27.4
      512   70.9     133.0          69.1        137.6          76.6
* "auto": packed for M < crossover, dequant for M >= crossover, the crossover taken from CROSSOVER_M
  (measured with bench/kernels.py on the 2-core Zen 3 dev box, see bench/results/kernels.md).  On CPUs
  with native bf16 (AMX / AVX512-BF16) the packed bf16 kernels are used for every M.
Whole decode step, TinyLlama-1.1B shape through load_runner (same box): batch 1 fp32 216 ms, int8 72 ms,
int4 83 ms (the int4 kernel is compute-bound at M=1: 0.84 vs 0.47 ms); batch 8 612 / 243 / 220 ms;
a 128-token prefill 1.96 / 1.95 / 2.32 s (int4 at group 128; group 32: 86 ms at batch 1 in a run where
int8 took 74).  int4 buys memory (640 MiB of Linear weights at group 32, 554 at 128, int8 989), not speed.
The request comes from the `kernel` argument, else the LANNER_WOQ_KERNEL environment variable
(auto|lanner|packed|dequant), else "auto".  The choice is logged once per model and carried in `QuantReport`.

For ATen's int4 dequant path we unpack ATen's packed nibbles ourselves; that layout depends on the ISA ATen
dispatches (blocks of 64 rows on AVX512, 32 on AVX2, pairs of rows in the generic kernel), so it is
identified at each `quantize_model` call by packing a probe matrix (`probe_int4_layout`); if no known layout
matches, int4 uses the packed kernel for every M and the report says why.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from app.quant import kernels
from app.quant.isa import CpuIsa, detect_isa
from app.quant.tiles import INT4_GROUP_SIZES

if TYPE_CHECKING:
    from app.quant.backends import WoqBackend

log = logging.getLogger("lanner.quant")

QuantMode = Literal["none", "int8", "int4"]
WoqBackendName = Literal["native", "torchao", "ipex"]  # who runs the WOQ matmuls (app/quant/backends)
KernelChoice = Literal["auto", "lanner", "packed", "dequant"]
KERNEL_ENV = "LANNER_WOQ_KERNEL"

# Rows M at or above which "auto" uses dequant+sgemm on CPUs without native bf16.  Measured with
# bench/kernels.py (2-core Zen 3, torch 2.13, 2048->5632 and 5632->2048): the packed kernels cost
# ~0.26 ms per row; dequant+sgemm ~4-5 ms (int8) / ~10 ms (int4) of dequantizing plus ~0.13 ms per row.
# The lines cross at M ~ 32-38 (int8) and ~ 70-73 (int4); e.g. at M=512 packed int8 takes 133 ms,
# dequant 69 ms (fp32: 71 ms); at M=1 packed int8 0.47 ms, dequant 3.9 ms.
CROSSOVER_M = MappingProxyType({"int8": 40, "int4": 72})
NEVER = sys.maxsize  # a crossover no batch reaches: packed kernel for every M
# Modes whose layers Lanner's own kernels run (app/quant/kernels.py), for every M.  Measured per call on
# the 2-core EPYC (AVX-512 VNNI, 2 threads), ms, own / ATen packed (bf16):
#   int8 2048->11264: M=1 0.18 / 0.83, M=16 2.5 / 7.1, M=64 7.2 / 27;  5632->2048: M=16 1.1 / 2.6, M=64 3.7 / 9.5
#   int8 head 32000x2048 (from DRAM): M=1 2.1 / 4.2, M=16 6.2 / 19, M=64 20 / 84
#   int4 2048->11264: M=1 0.20 / 0.65, M=16 2.2 / 4.8, M=64 7.9 / 18
# ATen's dequant + MKL sgemm was 39 ms at M=128 on 2048->11264, so no crossover is needed.
OWN_KERNEL_MODES = frozenset({"int8", "int4"})

DEFAULT_GROUP_SIZE = 32  # int4 group size unless one is requested (see the module comment)
KERNEL_GROUP_SIZES = INT4_GROUP_SIZES  # what _weight_int4pack_mm_for_cpu and Lanner's kernels accept
INT4_ROW_ALIGN = 64  # N padded to this (>= the kernel's 16, = its largest row block)
DEQUANT_CHUNK_BYTES = 4 << 20  # fp32 weight rows dequantized at once (4 MiB beat 1-16 MiB: fresh
# 16 MiB buffers are page-faulted in on every call, 26.7 vs 7.4 ms for int4 2048->5632 at M=1)
QUANTIZE_CHUNK_ROWS = 4096  # rows repacked at once for the int4 kernel (a multiple of INT4_ROW_ALIGN)
QUANTIZE_CHUNK_BYTES = 4 << 20  # fp32 weight quantized at once: bounds the quantizers' temporaries
INT4_CLIP_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85)  # int4 group ranges tried (min-MSE one kept)


# --------------------------------------------------------------------------- kernel plan


def resolve_kernel(kernel: str = "auto") -> KernelChoice:
    """The kernel request: the argument unless "auto", else $LANNER_WOQ_KERNEL, else "auto"."""
    choice = kernel if kernel != "auto" else (os.environ.get(KERNEL_ENV, "").strip().lower() or "auto")
    if choice not in get_args(KernelChoice):
        source = "kernel argument" if kernel != "auto" else KERNEL_ENV
        raise ValueError(f"{source}={choice!r}: expected one of {', '.join(get_args(KernelChoice))}")
    return choice  # type: ignore[return-value]


def crossover_rows(mode: str, isa: CpuIsa, kernel: KernelChoice) -> int:
    """Rows M from which a layer uses dequant+sgemm, not the packed kernel (0: always, NEVER: never)."""
    if kernel == "packed":
        return NEVER
    if kernel == "dequant":
        return 0
    if isa.native_bf16:
        return NEVER
    return CROSSOVER_M[mode]


def describe_path(mode: str, crossover: int, own: bool = False) -> str:
    if own:
        return f"lanner {mode} tiles (int dot, q8 act) for all M"
    packed = {"int8": "packed int8 (_weight_int8pack_mm, bf16 act)",
              "int4": "packed int4 (_weight_int4pack_mm_for_cpu, bf16 act)"}[mode]
    dequant = f"dequant {mode}->fp32 + sgemm"
    if crossover == NEVER:
        return f"{packed} for all M"
    if crossover == 0:
        return f"{dequant} for all M"
    return f"{packed} for M<{crossover}, {dequant} for M>={crossover}"


# --------------------------------------------------------------------------- int8


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [N, K] float -> q: [N, K] int8, scales: [N] fp32 (exactly representable in bf16)
    w = w.float()
    absmax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg())  # = |w|.amax(1), without a |w| copy
    scales = (absmax / 127.0).clamp(min=1e-8).to(torch.bfloat16).float()
    q = torch.div(w, scales[:, None]).round_().clamp_(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # q: [N, K] int8, scales: [N] -> [N, K] fp32
    return q.float() * scales[:, None]


def int8_rows(q: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # q: [N, K] int8, scales: [N] fp32, ids: any shape of row numbers -> [*ids.shape, K] fp32
    flat = ids.reshape(-1)
    out = q.index_select(0, flat).float().mul_(scales.index_select(0, flat).unsqueeze(1))
    return out.view(*ids.shape, q.shape[1])


def _chunk_rows(n: int, k: int, align: int = 1) -> int:
    """Rows per dequant chunk: at most DEQUANT_CHUNK_BYTES of fp32, a multiple of `align`."""
    rows = max(align, (DEQUANT_CHUNK_BYTES // (4 * k)) // align * align)
    return min(rows, n)


class Int8Linear(nn.Module):
    """Linear with int8 per-channel weights; fp32 in, fp32 out (see the module comment for the kernels)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 crossover_m: int) -> None:
        # q: [N, K] int8, scales: [N] fp32, bias: [N] | None
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.crossover_m = int(crossover_m)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, crossover_m: int) -> Int8Linear:
        qw = quantize_weight(linear.weight.detach(), "int8", bias=linear.bias)
        return cls.from_quantized(qw, crossover_m)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, crossover_m: int) -> Int8Linear:
        assert qw.mode == "int8"
        return cls(qw.qweight, qw.scales, qw.bias, crossover_m)

    def dequantize(self) -> torch.Tensor:
        # -> [N, K] fp32
        return dequantize_int8(self.weight, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Weight rows `ids` dequantized, [*ids.shape, K] fp32 (a tied model's token embedding)."""
        return int8_rows(self.weight, self.scales, ids)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N] fp32
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= self.crossover_m:
            y = self._dequant_mm(x2.float())
        else:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales_bf16).float()
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*lead, self.out_features)

    def _dequant_mm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] fp32 -> [M, N] fp32;  (x @ q^T) * s, one chunk of weight rows at a time
        n = self.out_features
        step = _chunk_rows(n, self.in_features)
        outs = []
        for i in range(0, n, step):
            y = torch.mm(x, self.weight[i:i + step].float().t())
            outs.append(y.mul_(self.scales[i:i + step]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, crossover_m={self.crossover_m}")


class _TiledLinear(nn.Module):
    """What the modules on Lanner's own kernels share: fp32 [..., K] in, [..., N] out, plus bias."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] fp32 contiguous -> [M, N] fp32
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.in_features).float().contiguous())
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*lead, self.out_features)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class TiledInt8Linear(_TiledLinear):
    """Int8 per-channel weights in Lanner's tile layout (app/quant/kernels.py `pack_int8`), run by Lanner's
    own kernel for every M (see OWN_KERNEL_MODES): integer dot products against activations quantized per
    32-block; streams the tiles at the memory bandwidth for decode and is compute-light for batches."""

    def __init__(self, tiles: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int, in_features: int) -> None:
        # tiles: [T, Kp/4, 16, 4] int8, scales: [16 T] fp32 (zero past out_features), bias: [N] | None
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("weight", tiles.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> TiledInt8Linear:
        assert qw.mode == "int8"
        tiles, scales = kernels.pack_int8(qw.qweight, qw.scales)
        return cls(tiles, scales, qw.bias, qw.out_features, qw.in_features)

    def dequantize(self) -> torch.Tensor:
        # -> [N, K] fp32
        n = self.out_features
        return dequantize_int8(kernels.unpack_int8(self.weight, n, self.in_features), self.scales[:n])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Weight rows `ids` dequantized, [*ids.shape, K] fp32 (a tied model's token embedding): row n is
        lane n % 16 of tile n // 16, its k in quads."""
        flat = ids.reshape(-1)
        # advanced indices on dims 0 and 2 around a slice: the index dim comes first -> [B, Kp/4, 4]
        q = self.weight[flat // kernels.TILE, :, flat % kernels.TILE, :].reshape(flat.numel(), -1)
        # scales past out_features (the last tile's padding) are not rows: an id there raises IndexError
        scales = self.scales[:self.out_features].index_select(0, flat)
        out = q[:, :self.in_features].float().mul_(scales.unsqueeze(1))
        return out.view(*ids.shape, self.in_features)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_mm(x, self.weight, self.scales, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# --------------------------------------------------------------------------- the token embedding


class Int8Embedding(nn.Module):
    """A quantized model's token embedding: int8 rows with one bf16-exact scale per row (the int8 scheme of
    the Linears, per token instead of per output channel).  A lookup dequantizes only the rows it reads, so
    it costs nothing per step; the table is 4x smaller than fp32 (TinyLlama 250 -> 63 MiB, falcon-7b 1.1 ->
    0.28 GiB).  llama.cpp's Q8_0 / Q4_0 files quantize their token embedding too."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        # qweight: [V, H] int8, scales: [V]
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("weight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: any shape -> [*ids.shape, H] fp32
        return int8_rows(self.weight, self.scales, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class TiedInt8Embedding(nn.Module):
    """The token embedding of a tied model (lm_head.weight is the embedding) whose head is int8: lookups
    read the head's own rows, which hold the same per-row int8 quantization of the same matrix, so the
    table is not stored twice (falcon-7b: 0.28 GiB).  The head stays the module that owns the weights."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._rows = head.rows  # a bound method, not a submodule: the head's buffers are counted once

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, rows of the output head"


def build_embedding(qw: QuantizedWeight, head: nn.Module | None = None,
                    detach: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> nn.Module:
    """The int8 token embedding of the quantized table `qw`.  `head` is a tied model's output head, built
    from the same `qw`: when its module can hand out rows (Lanner's and ATen's int8 modules), the embedding
    reads them instead of keeping a copy.  A table of its own keeps `detach` of qw's tensors (the loader's
    owned copy of what may still live in a memory-mapped file)."""
    if head is not None and callable(getattr(head, "rows", None)):
        return TiedInt8Embedding(head)
    return Int8Embedding(detach(qw.qweight), detach(qw.scales))


def embedding_kind(module: nn.Module) -> str:
    """What a decoder's token embedding is, for reports: fp32 | int8 | int8 (the head's rows)."""
    if isinstance(module, TiedInt8Embedding):
        return "int8 (the head's rows)"
    return "int8" if isinstance(module, Int8Embedding) else "fp32"


# --------------------------------------------------------------------------- int4


def pick_group_size(k: int, requested: int | None = None) -> int | None:
    """The int4 group size for input width k: `requested` (one the kernel accepts), else
    DEFAULT_GROUP_SIZE; None when it does not divide k (the caller falls back to int8)."""
    if requested is not None:
        if requested not in KERNEL_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {KERNEL_GROUP_SIZES}, got {requested}")
        return requested if k % requested == 0 else None
    return DEFAULT_GROUP_SIZE if k % DEFAULT_GROUP_SIZE == 0 else None


def int4_row_units(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # lo <= 0 <= hi: [n, groups] unclipped group ranges -> [n, 1] fp32 2^e, the unit of each row's scale
    # codes (kernels.code_units) for its widest step before rounding (clip ratio 1).  A NaN step, from NaN
    # weights, is skipped.
    steps = _int4_reach(lo, hi)[0]
    return kernels.code_units(torch.where(steps.isnan(), 0.0, steps).amax(dim=1, keepdim=True))


def _int4_reach(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # lo <= 0 <= hi: [...] range per group -> the unrounded step and the integer zero point in 0..15 (fp32).
    # The zero is where 0 falls on 16 levels spanning the range; the step is then the smallest that still
    # reaches both ends from that zero (rounding the zero alone would shift the grid by up to half a step
    # and clip one end).
    zeros = torch.div(lo, (hi - lo).clamp_(min=1e-12)).mul_(-15.0).round_().clamp_(0, 15)
    reach_hi = torch.where(zeros < 15, hi / (15.0 - zeros).clamp_(min=1.0), 0.0)
    reach_lo = torch.where(zeros > 0, lo.neg() / zeros.clamp(min=1.0), 0.0)
    return torch.maximum(reach_hi, reach_lo), zeros


def _int4_grid(lo: torch.Tensor, hi: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # lo <= 0 <= hi: [n, groups] range per group, units [n, 1] -> scales on the row's code grid (the
    # nearest multiple 1..255 of the unit to the step, half to even) and zero points, both fp32 [n, groups]
    reach, zeros = _int4_reach(lo, hi)
    return reach.div_(units).round_().clamp_(1, 255).mul_(units), zeros


def _int4_positions(g: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    # g: [n, groups, G] -> unrounded grid positions g / scale + zero, same shape (mul then add_: 4x faster
    # than addcmul with these broadcasts)
    return torch.mul(g, scales.reciprocal()[..., None]).add_(zeros[..., None])


def int4_range_search(g: torch.Tensor, clip_ratios: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # g: [n, groups, G] fp32 (whole rows) -> scales, zeros [n, groups] of the clip ratio with the least
    # squared error.  The range always holds 0, so the zero point is on the grid and an all-positive (or
    # all-negative) group is still represented.
    lo, hi = g.amin(dim=-1).clamp_(max=0), g.amax(dim=-1).clamp_(min=0)
    units = int4_row_units(lo, hi)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for ratio in clip_ratios:
        scales, zeros = _int4_grid(mid - half * ratio, mid + half * ratio, units)
        r = _int4_positions(g, scales, zeros)
        err = r.round().clamp_(0, 15).sub_(r).square_().sum(dim=-1).mul_(scales.square())
        if best is None:
            best = (err, scales, zeros)
            continue
        better = err < best[0]  # (torch.where chains measured 3x faster than stack + argmin + gather)
        best = (torch.where(better, err, best[0]), torch.where(better, scales, best[1]),
                torch.where(better, zeros, best[2]))
    assert best is not None
    return best[1], best[2]


def quantize_int4(w: torch.Tensor, group_size: int, clip_ratios: tuple[float, ...] = INT4_CLIP_RATIOS,
                  native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w: [N, K] float -> q: [N, K] uint8 in [0, 15], scales [N, K // G] fp32 (codes 1..255 times a power of
    # two per row, see the module comment; bf16-exact), zeros
    # [N, K // G] uint8 in [0, 15], so that w ~= (q - zeros) * scales per group.  Each group's range is
    # shrunk about its middle by every ratio in clip_ratios and the ratio with the smallest squared error is
    # kept (the search runs on blocks of rows to bound its temporaries).  `native` (default: wherever
    # Lanner's kernels are built) runs the same search as one C++ pass per group (`lanner::int4_quantize`,
    # 2-3x faster); this Python code is its reference, and the fallback.
    if native is None:
        native = kernels.available()
    if native:
        return torch.ops.lanner.int4_quantize(w.float().contiguous(), group_size, list(clip_ratios))
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size)
    zeros = torch.empty(n, k // group_size, dtype=torch.uint8)
    rows = max(1, (QUANTIZE_CHUNK_BYTES // 4) // k)
    for i in range(0, n, rows):
        g = w[i:i + rows].float().reshape(-1, k // group_size, group_size)
        s, z = int4_range_search(g, clip_ratios)
        q[i:i + rows] = _int4_positions(g, s, z).round_().clamp_(0, 15).reshape(-1, k)
        scales[i:i + rows], zeros[i:i + rows] = s, z
    return q, scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    # q: [N, K] (values 0..15), scales: [N, K // G], zeros: [N, K // G] (integers 0..15) -> [N, K] fp32
    n, k = q.shape
    g = q.float().reshape(n, k // group_size, group_size)
    return ((g - zeros.float()[..., None]) * scales.float()[..., None]).reshape(n, k)


@dataclass(frozen=True)
class Int4Layout:
    """How ATen's CPU int4 packing places rows: blocks of `block_n` rows, each [K, block_n / 2] bytes;
    "halves": byte j holds rows j (low nibble) and j + block_n/2 (high); "pairs": rows 2j and 2j+1."""

    block_n: int
    order: Literal["halves", "pairs"]


INT4_LAYOUTS = (Int4Layout(64, "halves"), Int4Layout(32, "halves"), Int4Layout(32, "pairs"),
                Int4Layout(64, "pairs"))


def unpack_int4_t(packed: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    # packed: [n, K/2] uint8 (n a multiple of layout.block_n) -> [K, n] uint8 values 0..15 (transposed)
    n, half_k = packed.shape
    bn = layout.block_n
    blocks = packed.view(n // bn, 2 * half_k, bn // 2)
    low, high = blocks & 0x0F, blocks >> 4
    if layout.order == "halves":
        rows = torch.cat((low, high), dim=-1)  # [nb, K, bn]
    else:
        rows = torch.stack((low, high), dim=-1).view(n // bn, 2 * half_k, bn)
    return rows.transpose(0, 1).reshape(2 * half_k, n)


def unpack_int4(packed: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    # packed: [n, K/2] uint8 -> [n, K] uint8 values 0..15
    return unpack_int4_t(packed, layout).t()


def probe_int4_layout() -> Int4Layout | None:
    """Which INT4_LAYOUTS entry this process's ATen packing uses (None if none matches)."""
    q = torch.randint(0, 16, (2 * INT4_ROW_ALIGN, 64), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    for layout in INT4_LAYOUTS:
        if torch.equal(unpack_int4(packed, layout).to(torch.int32), q):
            return layout
    return None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    # q: [N, K] int32 in 0..15, N a multiple of INT4_ROW_ALIGN -> [N, K/2] uint8 (ATen CPU layout)
    parts = [torch._convert_weight_to_int4pack_for_cpu(q[i:i + QUANTIZE_CHUNK_ROWS].contiguous(), 1)
             for i in range(0, q.shape[0], QUANTIZE_CHUNK_ROWS)]  # row blocks are packed independently
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------- portable quantized weights


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q: [N, K] integers in 0..15, K even -> [N, K/2] uint8, byte j = q[:, 2j] | q[:, 2j + 1] << 4
    q8 = q.to(torch.uint8)
    return q8[:, 0::2] | (q8[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    # packed: [N, K/2] uint8 (pack_nibbles' layout) -> [N, K] uint8 values 0..15
    n, half = packed.shape
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(n, 2 * half)


def fp32_nbytes(out_features: int, in_features: int, bias: bool) -> int:
    """Bytes of an fp32 Linear's weight (and bias): what a quantized one replaces, for reports."""
    return 4 * out_features * (in_features + (1 if bias else 0))


@dataclass
class QuantizedWeight:
    """One Linear's quantized weight in the portable form a checkpoint stores (app/quant/checkpoint.py).

    Both load paths -- quantize at load and a pre-quantized checkpoint -- build their modules from this
    form with `build_module`, so they give the same modules bit for bit.  Nothing here depends on the CPU:
    the int4 kernel layout (ATen's, ISA-dependent) is made from it at load (`Int4Linear.from_quantized`).
        int8: qweight int8 [N, K], scales [N];               w[n, k] = q[n, k] * s[n]
        int4: qweight uint8 [N, K/2] (two nibbles a byte, `pack_nibbles`), scales [N, K/G], zeros uint8
              [N, K/G] (0..15);  w[n, k] = (q[n, k] - z[n, g]) * s[n, g],  g = k // G
    scales hold bf16-exact values (fp32 or bf16 tensors); bias is [N] or None.
    """

    mode: Literal["int8", "int4"]
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None
    in_features: int
    group_size: int | None = None  # int4 only

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def fp32_nbytes(self) -> int:
        """Bytes of the fp32 weight (and bias) this replaces."""
        return fp32_nbytes(self.out_features, self.in_features, self.bias is not None)

    def row_block(self, a: int, b: int) -> QuantizedWeight:
        """Rows a..b (views; no bias): quantization is per row, so this is those rows quantized alone."""
        zeros = None if self.zeros is None else self.zeros[a:b]
        return QuantizedWeight(self.mode, self.qweight[a:b], self.scales[a:b], zeros, None, self.in_features,
                               self.group_size)

    @classmethod
    def cat(cls, parts: list[QuantizedWeight], bias: torch.Tensor | None = None) -> QuantizedWeight:
        """The row-wise concatenation of quantized blocks of rows (quantization is per row, so this equals
        quantizing the concatenated weight)."""
        first = parts[0]
        assert all(p.mode == first.mode and p.in_features == first.in_features
                   and p.group_size == first.group_size for p in parts)
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])  # type: ignore[misc]
        return cls(first.mode, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                   zeros, bias, first.in_features, first.group_size)

    def dequantize(self) -> torch.Tensor:
        # -> [N, K] fp32
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scales.float())
        assert self.zeros is not None and self.group_size is not None
        return dequantize_int4(unpack_nibbles(self.qweight), self.scales, self.zeros, self.group_size)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, mode: Literal["int8", "int4"], group_size: int | None = None,
                    bias: torch.Tensor | None = None,
                    release: Callable[[torch.Tensor], None] | None = None) -> QuantizedWeight:
    """w: [N, K] (any float dtype) -> its portable quantized form (int4 needs a valid group_size), a block
    of rows (QUANTIZE_CHUNK_BYTES of fp32) at a time so the temporaries stay small for big matrices.
    `release(rows)` is called with each block of w once it is quantized (the loader drops the block's
    pages of a memory-mapped source with it)."""
    n, k = w.shape
    # the outputs are allocated once and filled block by block (no list of blocks + concatenation, which
    # held the quantized matrix twice)
    q_out = torch.empty(n, k, dtype=torch.int8) if mode == "int8" else torch.empty(n, k // 2, dtype=torch.uint8)
    s_out = torch.empty(n) if mode == "int8" else torch.empty(n, k // group_size)  # type: ignore[operator]
    z_out = (None if mode == "int8"
             else torch.empty(n, k // group_size, dtype=torch.uint8))  # type: ignore[operator]
    for i, block in quantized_blocks(w, mode, group_size, release):
        rows = slice(i, i + block.out_features)
        q_out[rows], s_out[rows] = block.qweight, block.scales
        if z_out is not None:
            z_out[rows] = block.zeros
    return QuantizedWeight(mode, q_out, s_out, z_out, None if bias is None else bias.detach().float(), k,
                           group_size if mode == "int4" else None)


def quantized_blocks(w: torch.Tensor, mode: Literal["int8", "int4"], group_size: int | None = None,
                     release: Callable[[torch.Tensor], None] | None = None,
                     align: int = 1) -> Iterator[tuple[int, QuantizedWeight]]:
    """w [N, K] quantized a block of rows (about QUANTIZE_CHUNK_BYTES of fp32, a multiple of `align` rows)
    at a time: (first row, the block's portable form).  `release` as for quantize_weight."""
    n, k = w.shape
    step = max(1, (QUANTIZE_CHUNK_BYTES // 4) // k)
    step = max(align, step - step % align)
    if mode == "int4":
        assert group_size is not None and k % group_size == 0
    for i in range(0, n, step):
        rows = w[i:i + step].float()
        if mode == "int8":
            q, s = quantize_int8(rows)
            block = QuantizedWeight(mode, q, s, None, None, k)
        else:
            q, s, z = quantize_int4(rows, group_size)  # type: ignore[arg-type]
            block = QuantizedWeight(mode, pack_nibbles(q), s, z, None, k, group_size)
        del rows, q
        yield i, block
        if release is not None:
            release(w[i:i + step])


@dataclass
class PackedWeight:
    """A Linear quantized straight into Lanner's tiles (`TilePacker`): what `build_module` makes a
    TiledInt8Linear / TiledInt4Linear from without a portable form of the whole matrix next to its tiles
    (falcon-7b's 4544 x 18176 Linear: 79 MiB of int8 that loading at once held twice)."""

    mode: Literal["int8", "int4"]
    tiles: tuple[torch.Tensor, ...]  # int8: (tiles, scales); int4: (nibbles, scales, zeros), see kernels.py
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    group_size: int | None = None  # int4 only

    @property
    def fp32_nbytes(self) -> int:
        return fp32_nbytes(self.out_features, self.in_features, self.bias is not None)


class TilePacker:
    """Quantizes a Linear's weight straight into Lanner's tiles, a block of rows at a time: `add` each row
    block of the [n, k] weight in order (the fused parts q | k | v one after the other), then `finish`.  Only
    one block's portable form exists at a time (rows short of a whole tile wait for the next block), and the
    tiles are bit for bit `kernels.pack_int8/pack_int4` of `quantize_weight` of the whole matrix:
    quantization is per row and packing per tile."""

    def __init__(self, mode: Literal["int8", "int4"], n: int, k: int, group_size: int | None = None) -> None:
        self.mode, self.n, self.k, self.group_size = mode, n, k, group_size
        self.out = kernels.empty_tiles(mode, n, k, group_size)
        self.rows = 0  # rows packed into whole tiles so far
        self.carry: QuantizedWeight | None = None  # quantized rows short of a whole tile

    def add(self, w: torch.Tensor, release: Callable[[torch.Tensor], None] | None = None) -> None:
        assert w.shape[1] == self.k
        for _, block in quantized_blocks(w, self.mode, self.group_size, release, align=kernels.TILE):
            if self.carry is not None:
                block, self.carry = QuantizedWeight.cat([self.carry, block]), None
            whole = block.out_features - block.out_features % kernels.TILE
            if whole < block.out_features:
                self.carry = block.row_block(whole, block.out_features)
            if whole:
                self._pack(block.row_block(0, whole) if whole < block.out_features else block)
            del block

    def finish(self, bias: torch.Tensor | None = None) -> PackedWeight:
        if self.carry is not None:
            self._pack(self.carry)  # the last tile, padded with zero rows
            self.carry = None
        assert self.rows >= self.n and self.rows - self.n < kernels.TILE
        return PackedWeight(self.mode, self.out, None if bias is None else bias.detach().float(), self.k, self.n,
                            self.group_size if self.mode == "int4" else None)

    def _pack(self, qw: QuantizedWeight) -> None:
        packed = (kernels.pack_int8(qw.qweight, qw.scales) if self.mode == "int8"
                  else kernels.pack_int4(qw.qweight, qw.scales, qw.zeros))  # type: ignore[arg-type]
        t0 = self.rows // kernels.TILE
        t1 = t0 + packed[0].shape[0]
        for dst, src in zip(self.out, packed):
            if dst.dim() == 1:  # int8 scales, [16 T]
                dst[t0 * kernels.TILE:t1 * kernels.TILE] = src
            else:
                dst[t0:t1] = src
        self.rows = t1 * kernels.TILE


class Int4Linear(nn.Module):
    """Linear with group-wise asymmetric int4 weights; fp32 in, fp32 out."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int, in_features: int, group_size: int, crossover_m: int,
                 layout: Int4Layout | None) -> None:
        # packed: [N_pad, K/2] uint8, scales_and_zeros: [K/G, N_pad, 2] bf16, bias: [N] | None
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.layout = layout
        self.crossover_m = int(crossover_m) if layout is not None else NEVER
        self.register_buffer("weight", packed.contiguous())
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int, crossover_m: int,
                    layout: Int4Layout | None) -> Int4Linear:
        qw = quantize_weight(linear.weight.detach(), "int4", group_size, bias=linear.bias)
        return cls.from_quantized(qw, crossover_m, layout)

    @classmethod
    @torch.no_grad()
    def from_quantized(cls, qw: QuantizedWeight, crossover_m: int, layout: Int4Layout | None) -> Int4Linear:
        """The kernel's layout from the portable one: rows padded to INT4_ROW_ALIGN (q = scale = zero = 0,
        outputs sliced off), nibbles repacked by ATen for this CPU, scales and ATen's float zeros (8 - z) * s
        as bf16 [K/G, N_pad, 2]."""
        assert qw.mode == "int4" and qw.zeros is not None and qw.group_size is not None
        n, k, g = qw.out_features, qw.in_features, qw.group_size
        n_pad = -(-n // INT4_ROW_ALIGN) * INT4_ROW_ALIGN
        packed = []
        for i in range(0, n_pad, QUANTIZE_CHUNK_ROWS):  # QUANTIZE_CHUNK_ROWS is a multiple of the row align
            rows = unpack_nibbles(qw.qweight[i:min(i + QUANTIZE_CHUNK_ROWS, n)]).to(torch.int32)
            want = min(QUANTIZE_CHUNK_ROWS, n_pad - i)
            if rows.shape[0] < want:
                rows = torch.cat([rows, rows.new_zeros(want - rows.shape[0], k)])
            packed.append(torch._convert_weight_to_int4pack_for_cpu(rows, 1))
        scales = qw.scales.float()
        sz = torch.stack((scales, (8.0 - qw.zeros.float()) * scales), dim=-1)  # [N, K/G, 2]
        if n_pad > n:
            sz = torch.cat([sz, sz.new_zeros(n_pad - n, k // g, 2)])
        scales_and_zeros = sz.transpose(0, 1).to(torch.bfloat16)
        return cls(torch.cat(packed) if len(packed) > 1 else packed[0], scales_and_zeros, qw.bias, n, k, g,
                   crossover_m, layout)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _dequant_rows_t(self, start: int, stop: int) -> torch.Tensor:
        # -> W[start:stop]^T as [K, stop - start] fp32 (start/stop multiples of the layout's block).
        # Transposed so the per-group scale/zero broadcast runs along the contiguous n axis (vectorized),
        # and the uint8 -> fp32 conversion happens inside addcmul.
        assert self.layout is not None
        n, k, g = stop - start, self.in_features, self.group_size
        q = unpack_int4_t(self.weight[start:stop], self.layout).view(k // g, g, n)
        sz = self.scales_and_zeros[:, start:stop].float()  # [K/G, n, 2]
        scales = sz[..., 0].contiguous()
        shift = sz[..., 1] - 8.0 * scales  # zero - 8 * scale
        return torch.addcmul(shift[:, None, :], q, scales[:, None, :]).view(k, n)

    def dequantize(self) -> torch.Tensor:
        # -> [N, K] fp32 (needs a known layout)
        return self._dequant_rows_t(0, self.weight.shape[0]).t()[:self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N] fp32
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= self.crossover_m:
            y = self._dequant_mm(x2.float())
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.weight, self.group_size,
                                                  self.scales_and_zeros)
            if y.shape[1] != self.out_features:
                y = y[:, :self.out_features]
            y = y.float()
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*lead, self.out_features)

    def _dequant_mm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] fp32 -> [M, N] fp32, one chunk of weight rows at a time
        n = self.out_features
        step = _chunk_rows(self.weight.shape[0], self.in_features, INT4_ROW_ALIGN)
        outs = []
        for i in range(0, n, step):
            w_t = self._dequant_rows_t(i, min(i + step, self.weight.shape[0]))[:, :min(step, n - i)]
            outs.append(torch.mm(x, w_t))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, crossover_m={self.crossover_m}")


class TiledInt4Linear(_TiledLinear):
    """Group-wise int4 weights in Lanner's tile layout (app/quant/kernels.py `pack_int4`), run by Lanner's
    own kernel for every M (see OWN_KERNEL_MODES), like TiledInt8Linear."""

    def __init__(self, nib: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int, group_size: int) -> None:
        # nib: [T, K/4, 8, 4] uint8, scales: [T, 4 + K/G, 16] uint8 (the rows' units, then the codes),
        # zeros: [T, K/G, 8] uint8 (two 4-bit zero points a byte), bias: [N] | None
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, 4 * nib.shape[1], group_size
        self.register_buffer("weight", nib.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zeros", zeros.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> TiledInt4Linear:
        assert qw.mode == "int4" and qw.zeros is not None and qw.group_size is not None
        nib, scales, zeros = kernels.pack_int4(qw.qweight, qw.scales, qw.zeros)
        return cls(nib, scales, zeros, qw.bias, qw.out_features, qw.group_size)

    def dequantize(self) -> torch.Tensor:
        # -> [N, K] fp32
        q, s, z = kernels.unpack_int4(self.weight, self.scales, self.zeros, self.out_features)
        return dequantize_int4(q, s, z, self.group_size)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int4_mm(x, self.weight, self.scales, self.zeros, self.group_size, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


# --------------------------------------------------------------------------- the swap


@dataclass(frozen=True)
class QuantReport:
    mode: str
    num_swapped: int = 0
    bytes_before: int = 0  # fp32 weights + biases of the swapped Linear modules
    bytes_after: int = 0  # their quantized buffers (weights, scales, zeros, biases)
    kernel: str = "fp32 F.linear"  # the per-M kernel path, for logs and metrics
    isa: str = ""
    group_sizes: tuple[int, ...] = ()  # int4 group sizes used
    head: str = "fp32"  # what the output head became: fp32 | int8 | int4
    fallbacks: tuple[str, ...] = field(default=())  # "module: reason" for layers not quantized as asked
    backend: str = "native"  # the WOQ backend whose modules run the layers (app/quant/backends)
    embedding: str = "fp32"  # the token embedding: fp32 | int8 | int8 (the head's rows), see embedding_kind

    def summary(self) -> str:
        if self.mode == "none":
            return "quantize=none: fp32 weights, F.linear"
        mb = 1 / 2**20
        text = (f"quantize={self.mode}: {self.num_swapped} Linear modules, "
                f"{self.bytes_before * mb:.1f} MiB -> {self.bytes_after * mb:.1f} MiB; "
                f"backend: {self.backend}; kernel: {self.kernel}; "
                f"cpu: {self.isa}")
        if self.group_sizes:
            text += f"; group sizes {list(self.group_sizes)}"
        text += f"; head {self.head}; embedding {self.embedding}"
        if self.fallbacks:
            text += f"; fallbacks: {'; '.join(self.fallbacks)}"
        return text


def _is_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "lm_head"


def _linear_names(model: nn.Module, include_head: bool) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (include_head or not _is_head(name))]


def check_mode(mode: str) -> None:
    if mode not in get_args(QuantMode):
        raise ValueError(f"quantize must be one of {', '.join(get_args(QuantMode))}, got {mode!r}")


def check_head(int4_head: str) -> None:
    if int4_head not in ("int8", "int4"):
        raise ValueError(f"int4_head must be int8 or int4, got {int4_head!r}")


def check_backend(backend: str) -> None:
    if backend not in get_args(WoqBackendName):
        raise ValueError(f"woq_backend must be one of {', '.join(get_args(WoqBackendName))}, got {backend!r}")


def linear_plan(name: str, in_features: int, mode: Literal["int8", "int4"], group_size: int | None = None,
                int4_head: Literal["int8", "int4"] = "int8"
                ) -> tuple[Literal["int8", "int4"], int | None, str | None]:
    """How the Linear `name` is quantized in `mode`: (int8 | int4, int4 group size, fallback note or None).
    In int4 mode the head is `int4_head`, and a layer whose K no kernel group size divides is int8."""
    if mode == "int8" or (_is_head(name) and int4_head == "int8"):
        return "int8", None, None
    g = pick_group_size(in_features, group_size)
    if g is None:
        return "int8", None, (f"{name}: int8 (no int4 group size in {KERNEL_GROUP_SIZES} divides "
                               f"K={in_features})")
    return "int4", g, None


@dataclass(frozen=True)
class KernelPlan:
    """The kernel paths of one model's WOQ modules: decided once per load from the ISA and overrides.

    `backend` names the library that runs them (app/quant/backends); for any but "native", `impl` is that
    backend's module builder and the native fields (choice, crossover, layout) are unused."""

    isa: CpuIsa
    choice: KernelChoice
    crossover: Mapping[str, int]  # mode -> rows M from which dequant+sgemm is used
    layout: Int4Layout | None  # ATen's int4 packing on this CPU (for the int4 dequant path)
    notes: tuple[str, ...] = ()
    backend: str = "native"
    impl: WoqBackend | None = None
    own: frozenset[str] = frozenset()  # modes run by Lanner's own kernels (app/quant/kernels.py)

    def describe(self, used: Iterable[str]) -> str:
        if self.impl is not None:
            return self.impl.describe(used)
        used = set(used)
        path = "; ".join(f"{m}: {describe_path(m, self.crossover[m], m in self.own)}"
                         for m in ("int4", "int8") if m in used)
        if self.choice != "auto":
            path += f" (forced kernel={self.choice})"
        return path + "".join(f"; {n}" for n in self.notes)


def kernel_plan(mode: str, kernel: str = "auto", isa: CpuIsa | None = None,
                backend: str = "native") -> KernelPlan:
    """The plan for one model: the backend's (checked and imported here, WoqBackendUnavailable if it
    cannot run), or for "native" the kernel paths chosen from the ISA and the kernel override: Lanner's
    own kernels where they are built ("auto", "lanner"; "lanner" raises if they cannot be), else ATen's."""
    isa = isa or detect_isa()
    if backend != "native":
        from app.quant.backends import load_backend

        impl = load_backend(backend, mode, isa)
        return KernelPlan(isa, "auto", MappingProxyType({}), None, (), backend, impl)
    choice = resolve_kernel(kernel)
    crossover = {m: crossover_rows(m, isa, "auto" if choice == "lanner" else choice) for m in ("int8", "int4")}
    layout, notes, own = None, [], set()
    if choice in ("auto", "lanner"):
        built = kernels.load()
        if built.ok:
            own = set(OWN_KERNEL_MODES)
            notes.append(f"lanner kernels: {built.isa} dot products")
        elif choice == "lanner":
            raise ValueError(f"kernel=lanner: Lanner's own kernels are unavailable ({built.detail})")
        else:
            notes.append(f"own kernels unavailable ({built.detail})")
    if mode == "int4" and "int4" not in own and crossover["int4"] != NEVER:
        layout = probe_int4_layout()
        if layout is None:
            notes.append("int4 dequant path off: ATen's int4 packing layout is unknown on this CPU")
            crossover["int4"] = NEVER
    return KernelPlan(isa, choice, MappingProxyType(crossover), layout, tuple(notes), own=frozenset(own))


def build_module(qw: QuantizedWeight | PackedWeight, plan: KernelPlan) -> nn.Module:
    """The WOQ module for a portable quantized weight (the one constructor both load paths use): on the
    native backend a TiledInt8Linear / TiledInt4Linear (Lanner's kernels) or Int8Linear / Int4Linear
    (ATen's), else the plan's backend's module."""
    if isinstance(qw, PackedWeight):
        assert plan.impl is None and qw.mode in plan.own
        if qw.mode == "int8":
            return TiledInt8Linear(*qw.tiles, qw.bias, qw.out_features, qw.in_features)
        return TiledInt4Linear(*qw.tiles, qw.bias, qw.out_features, qw.group_size)  # type: ignore[arg-type]
    if plan.impl is not None:
        return plan.impl.build(qw)
    if qw.mode in plan.own:
        return TiledInt8Linear.from_quantized(qw) if qw.mode == "int8" else TiledInt4Linear.from_quantized(qw)
    if qw.mode == "int8":
        return Int8Linear.from_quantized(qw, plan.crossover["int8"])
    return Int4Linear.from_quantized(qw, plan.crossover["int4"], plan.layout)


class ReportBuilder:
    """Collects the modules of one quantized model into its QuantReport."""

    def __init__(self, mode: str, plan: KernelPlan) -> None:
        self.mode, self.plan = mode, plan
        self.swapped = self.before = self.after = 0
        self.groups: set[int] = set()
        self.used: set[str] = set()
        self.fallbacks: list[str] = []
        self.head = "fp32"
        self.embedding = "fp32"  # set by whoever swaps the embedding (embedding_kind)

    def add(self, name: str, qw: QuantizedWeight | PackedWeight, module: nn.Module,
            fallback: str | None = None) -> None:
        self.swapped += 1
        self.before += qw.fp32_nbytes
        self.after += (self.plan.impl.nbytes(module, qw) if self.plan.impl is not None
                       else sum(b.numel() * b.element_size() for b in module.buffers()))
        self.used.add(qw.mode)
        if qw.group_size is not None:
            self.groups.add(qw.group_size)
        if fallback:
            self.fallbacks.append(fallback)
        if _is_head(name):
            self.head = qw.mode

    def build(self) -> QuantReport:
        report = QuantReport(mode=self.mode, num_swapped=self.swapped, bytes_before=self.before,
                             bytes_after=self.after, kernel=self.plan.describe(self.used),
                             isa=self.plan.isa.describe(), group_sizes=tuple(sorted(self.groups)),
                             head=self.head, fallbacks=tuple(self.fallbacks), backend=self.plan.backend,
                             embedding=self.embedding)
        log.info("%s", report.summary())
        return report


@torch.no_grad()
def quantize_model(model: nn.Module, mode: QuantMode, *, group_size: int | None = None, kernel: str = "auto",
                   include_head: bool = True, int4_head: Literal["int8", "int4"] = "int8",
                   isa: CpuIsa | None = None, backend: str = "native", embedding: bool = True) -> QuantReport:
    """Swap every nn.Linear of `model` (in place) for its WOQ module; see the module comment.  With
    `embedding`, an nn.Embedding `model.embed_tokens` becomes int8 too (`build_embedding`; when the model
    is tied -- lm_head.weight is that embedding's weight -- and its head int8, the head's rows).

    `backend` (native | torchao | ipex, app/quant/backends) decides whose modules those are; the quantized
    values are the same on every backend.

    The output head (`lm_head`) is quantized too unless include_head=False; in int4 mode it is int8 by
    default (`int4_head`), as llama.cpp keeps Q4_0 models' output matrix at 6 bits: the head's error
    lands on the logits directly, and it is a small share of the weights.
    """
    check_mode(mode)
    check_backend(backend)
    if mode == "none":
        return QuantReport(mode="none")
    plan = kernel_plan(mode, kernel, isa, backend)
    report = ReportBuilder(mode, plan)
    embed = getattr(model, "embed_tokens", None) if embedding else None
    if not isinstance(embed, nn.Embedding):
        embed = None
    head = getattr(model, "lm_head", None)
    tied = embed is not None and isinstance(head, nn.Linear) and head.weight is embed.weight
    head_qw = None
    for name in _linear_names(model, include_head):
        linear = model.get_submodule(name)
        kind, g, fallback = linear_plan(name, linear.in_features, mode, group_size, int4_head)
        qw = quantize_weight(linear.weight.detach(), kind, g, bias=linear.bias)
        new = build_module(qw, plan)
        report.add(name, qw, new, fallback)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        if tied and name == "lm_head" and kind == "int8":
            head_qw = qw  # the embedding's table (kept only when it is one)
        del linear, qw
    if embed is not None:
        if tied and head_qw is not None:
            model.embed_tokens = build_embedding(head_qw, model.lm_head)
        else:
            model.embed_tokens = build_embedding(quantize_weight(embed.weight.detach(), "int8"))
        report.embedding = embedding_kind(model.embed_tokens)
    return report.build()


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 reference matmul used by tests and benchmarks: x [M, K] @ weight [N, K]^T + bias."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


__all__ = [
    "CROSSOVER_M", "KERNEL_ENV", "OWN_KERNEL_MODES", "Int4Layout", "Int4Linear", "Int8Embedding", "Int8Linear",
    "KernelPlan", "TiedInt8Embedding", "build_embedding", "embedding_kind", "int8_rows",
    "QuantReport", "TiledInt4Linear", "TiledInt8Linear",
    "WoqBackendName", "check_backend", "check_head",
    "QuantizedWeight", "ReportBuilder", "build_module", "crossover_rows", "dequantize_int4",
    "dequantize_int8",
    "kernel_plan", "linear_plan", "pack_nibbles", "pick_group_size", "probe_int4_layout", "quantize_int4",
    "quantize_int8", "quantize_model", "quantize_weight", "resolve_kernel", "unpack_int4", "unpack_nibbles",
]
