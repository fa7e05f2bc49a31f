"""The `ipex` WOQ backend: Intel Extension for PyTorch's WeightOnlyQuantizedLinear.

Each Linear becomes `WeightOnlyQuantizedLinear.from_float_and_qweight(...)` (IPEX 2.8,
intel_extension_for_pytorch/nn/modules/weight_only_quantization.py) fed with Lanner's own quantized
values, so IPEX packs them for its kernel without re-quantizing:
    int8  qweight int8 [N, K], scales [N], no zero points (symmetric), per channel
    int4  qweight uint8 [N, K/2] -- Lanner's portable nibble order (byte j = q[2j] | q[2j+1] << 4) is
          IPEX's plain int4 format -- scales [N, K/G] and zero points 8 - z/s [N, K/G] (fp32), so IPEX's
          (q - zp) * s equals Lanner's (q - 8) * s + z.
The qconfig comes from `ipex.quantization.get_weight_only_quant_qconfig_mapping(weight_dtype=...,
lowp_mode=..., group_size=...)`.  lowp_mode (the lowest precision IPEX may compute in) is chosen by ISA:
BF16 where bf16 is native (AMX / AVX512-BF16), else NONE (fp32 compute, the activations' dtype); it is
logged, and $LANNER_IPEX_LOWP_MODE (none|fp16|bf16|int8) overrides it.

IPEX 2.8 works with torch 2.8 only.  Its import compares the versions itself and then calls `os.exit(127)`
(which does not exist: an AttributeError), so the versions are compared here *before* importing it, and a
mismatch is a WoqBackendUnavailable naming torch 2.8 and scripts/ipex-env.sh, which builds the separate
torch 2.8 environment.  IPEX 2.8 also cannot be imported next to transformers 5 (its bundled reference
models use transformers 4.x names at import: NameError 'MoeModelOutputWithPast'); the IPEX environment
therefore has transformers 4.57.6, with which Lanner runs too.  Importing IPEX patches a few transformers
functions (remote-code helpers, PreTrainedTokenizerBase.pad); Lanner uses neither.

Measured on the 2-core AMD Zen 3 (AVX2, no AVX-512/AMX): see bench/results/ipex/ and
docs/quantization.md -- IPEX's CPU WOQ kernels target AVX-512/AMX Xeons.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from app.quant.backends import WoqBackendUnavailable, tensor_nbytes
from app.quant.isa import CpuIsa
from app.quant.woq import QuantizedWeight

log = logging.getLogger("lanner.quant")

IPEX_DIST = "intel-extension-for-pytorch"
IPEX_TESTED = "2.8"  # the IPEX (and so torch) release this backend was written and run against
LOWP_ENV = "LANNER_IPEX_LOWP_MODE"
LOWP_MODES = ("none", "fp16", "bf16", "int8")
ENV_HINT = ("IPEX 2.8 needs torch 2.8 exactly: build its separate environment with scripts/ipex-env.sh "
            "(torch==2.8.0 + intel-extension-for-pytorch==2.8.0), or use woq_backend: native")


def major_minor(version: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


def check_ipex_environment(torch_version: str | None = None, ipex_version: str | None = None) -> str:
    """The installed IPEX version if it can run with this torch, else WoqBackendUnavailable.  Reads only
    package metadata (never imports IPEX, whose own check would end in an AttributeError).  The arguments
    override the live versions (for tests); ipex_version "" means not installed."""
    torch_version = torch_version or torch.__version__
    if ipex_version is None:
        try:
            ipex_version = importlib.metadata.version(IPEX_DIST)
        except importlib.metadata.PackageNotFoundError:
            ipex_version = ""
        if ipex_version and importlib.util.find_spec("intel_extension_for_pytorch") is None:
            ipex_version = ""
    if not ipex_version:
        if major_minor(torch_version) != IPEX_TESTED:
            raise WoqBackendUnavailable(
                f"woq_backend=ipex: intel-extension-for-pytorch is not installed, and this environment has "
                f"torch {torch_version}; {ENV_HINT}.")
        raise WoqBackendUnavailable(f"woq_backend=ipex: intel-extension-for-pytorch is not installed: "
                                    f"pip install intel-extension-for-pytorch=={torch_version.split('+')[0]} "
                                    f"(it must match torch {major_minor(torch_version)}), "
                                    "or use woq_backend: native.")
    if major_minor(ipex_version) != major_minor(torch_version):
        raise WoqBackendUnavailable(
            f"woq_backend=ipex: intel-extension-for-pytorch {ipex_version} needs torch "
            f"{major_minor(ipex_version)}, but this environment has torch {torch_version}; {ENV_HINT}.")
    return ipex_version


def choose_lowp_mode(isa: CpuIsa) -> tuple[str, str]:
    """(lowp mode, why): $LANNER_IPEX_LOWP_MODE, else bf16 where bf16 is native, else none (fp32)."""
    forced = os.environ.get(LOWP_ENV, "").strip().lower()
    if forced:
        if forced not in LOWP_MODES:
            raise ValueError(f"{LOWP_ENV}={forced!r}: expected one of {', '.join(LOWP_MODES)}")
        return forced, f"forced by {LOWP_ENV}"
    if isa.native_bf16:
        return "bf16", "native bf16 (AMX/AVX512-BF16)"
    return "none", "no native bf16: fp32 compute"


@dataclass
class IpexBackend:
    version: str
    ipex: Any  # the intel_extension_for_pytorch module
    linear_cls: Any  # WeightOnlyQuantizedLinear
    lowp_mode: str
    lowp_reason: str
    ipex_isa: str
    name: str = "ipex"

    @classmethod
    def load(cls, mode: str, isa: CpuIsa) -> IpexBackend:
        version = check_ipex_environment()
        try:
            import intel_extension_for_pytorch as ipex
            from intel_extension_for_pytorch.nn.modules.weight_only_quantization import (
                WeightOnlyQuantizedLinear,
            )
        except Exception as exc:  # noqa: BLE001 -- a broken install can fail in any way
            import transformers

            raise WoqBackendUnavailable(
                f"woq_backend=ipex: importing intel-extension-for-pytorch {version} failed "
                f"({type(exc).__name__}: {exc}) with transformers {transformers.__version__}; IPEX 2.8 "
                f"imports only next to transformers 4.x (4.57.6 tested); {ENV_HINT}.") from exc
        lowp, why = choose_lowp_mode(isa)
        try:
            from intel_extension_for_pytorch.cpu.utils import _cpu_isa

            ipex_isa = "avx2" if _cpu_isa.check_avx2_support() else "below avx2"
            if hasattr(ipex._C, "_get_current_isa_level"):
                ipex_isa = str(ipex._C._get_current_isa_level()).lower()
        except Exception:  # noqa: BLE001 -- informational only
            ipex_isa = "unknown"
        backend = cls(version, ipex, WeightOnlyQuantizedLinear, lowp, why, ipex_isa)
        log.info("woq_backend=ipex: intel-extension-for-pytorch %s, torch %s, IPEX ISA %s, "
                 "lowp_mode=%s (%s)", version, torch.__version__, ipex_isa, lowp, why)
        return backend

    def qconfig(self, mode: str, group_size: int | None) -> Any:
        q = self.ipex.quantization
        mapping = q.get_weight_only_quant_qconfig_mapping(
            weight_dtype=q.WoqWeightDtype.INT8 if mode == "int8" else q.WoqWeightDtype.INT4,
            lowp_mode=getattr(q.WoqLowpMode, self.lowp_mode.upper()),
            group_size=group_size if mode == "int4" else -1,
            weight_qscheme=q.WoqWeightQScheme.SYMMETRIC if mode == "int8" else q.WoqWeightQScheme.ASYMMETRIC)
        return mapping.global_qconfig

    @torch.no_grad()
    def build(self, qw: QuantizedWeight) -> nn.Module:
        q = self.ipex.quantization
        n, k = qw.out_features, qw.in_features
        with torch.device("meta"):
            float_mod = nn.Linear(k, n, bias=False)
        float_mod.qconfig = self.qconfig(qw.mode, qw.group_size)
        bias = None if qw.bias is None else qw.bias.float().contiguous()
        if qw.mode == "int8":
            return self.linear_cls.from_float_and_qweight(
                float_mod, qw.qweight.contiguous(), q.WoqWeightDtype.INT8, qw.scales.float().contiguous(),
                None, bias=bias, group_size=-1)
        assert qw.zeros is not None and qw.group_size is not None
        scales = qw.scales.float().contiguous()
        zero_points = qw.zeros.float().contiguous()  # w = (q - z) * s, q the raw nibble
        return self.linear_cls.from_float_and_qweight(
            float_mod, qw.qweight.contiguous(), q.WoqWeightDtype.INT4, scales, zero_points, bias=bias,
            group_size=qw.group_size)

    def describe(self, used: Iterable[str]) -> str:
        modes = "/".join(m for m in ("int4", "int8") if m in set(used))
        return (f"ipex {self.version}: WeightOnlyQuantizedLinear {modes}, lowp_mode={self.lowp_mode} "
                f"({self.lowp_reason}); IPEX ISA {self.ipex_isa}")

    def nbytes(self, module: nn.Module, qw: QuantizedWeight) -> int:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):  # IPEX's packed weight; scales etc. live in its op context
            return tensor_nbytes(weight, qw.scales, qw.zeros, qw.bias)
        return tensor_nbytes(qw.qweight, qw.scales, qw.zeros, qw.bias)
