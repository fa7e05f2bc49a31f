"""CPU instruction-set detection for choosing weight-only-quantization kernels.

Read once at start-up (by `quantize_model`) from two sources:

* `/proc/cpuinfo` flags (Linux): what the silicon offers — avx2, avx512f, avx512_bf16, amx_tile,
  amx_bf16, and the integer dot products Lanner's own kernels use (avx512_vnni, avx_vnni; the kernels
  themselves are compiled with -march=native, so this is for the logs). These decide whether bf16
  arithmetic is native (AMX tiles or AVX512-BF16 dot products) or emulated (AVX2: bf16 is converted to
  fp32 in registers, so bf16 GEMMs are slower than sgemm).
* `torch.backends.cpu.get_cpu_capability()`: which of ATen's compiled kernel variants is dispatched
  ("DEFAULT", "AVX2", "AVX512", ...). It can be lowered with ATEN_CPU_CAPABILITY, so it is the truth for
  what ATen's own kernels will run; the packed int4 weight layout also follows it.

`native_bf16` is True only with AMX-BF16 or AVX512-BF16 *and* ATen dispatching its AVX512 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuIsa:
    avx2: bool
    avx512f: bool
    avx512_bf16: bool
    amx_tile: bool
    amx_bf16: bool
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX2"
    avx512_vnni: bool = False
    avx_vnni: bool = False

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run natively (AMX or AVX512-BF16) in the kernels ATen dispatches."""
        return (self.amx_bf16 or self.avx512_bf16) and self.torch_capability.upper().startswith("AVX512")

    def describe(self) -> str:
        names = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
        flags = [name for name in names if getattr(self, name)]
        return (f"torch={self.torch_capability} flags={','.join(flags) or 'none'} "
                f"native_bf16={'yes' if self.native_bf16 else 'no'}")


def cpu_flags(cpuinfo_text: str) -> frozenset[str]:
    """The `flags` of the first processor in a /proc/cpuinfo text (empty if there is none)."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def detect_isa(cpuinfo_text: str | None = None, torch_capability: str | None = None) -> CpuIsa:
    """The CPU's ISA features; arguments override the live sources (for tests)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text()
        except OSError:  # not Linux: rely on torch's capability alone
            cpuinfo_text = ""
    if torch_capability is None:
        import torch

        torch_capability = str(torch.backends.cpu.get_cpu_capability())
    flags = cpu_flags(cpuinfo_text)
    cap = torch_capability.upper()
    if not flags:  # no cpuinfo: infer what we can from the dispatched capability
        flags = frozenset({"avx2"} if cap in ("AVX2", "AVX512") else set()) | (
            frozenset({"avx512f"}) if cap.startswith("AVX512") else frozenset())
    return CpuIsa(
        avx2="avx2" in flags,
        avx512f="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx_tile="amx_tile" in flags,
        amx_bf16="amx_bf16" in flags,
        torch_capability=torch_capability,
        avx512_vnni="avx512_vnni" in flags,
        avx_vnni="avx_vnni" in flags,
    )
