"""WOQ backends: which library runs a quantized model's Linear layers (`woq_backend`, per model).

    native   (default) Lanner's Int8Linear / Int4Linear on ATen's CPU kernels -- the weight-only kernels
             IPEX upstreamed into PyTorch (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); the
             kernel path is chosen by CPU ISA and batch rows, logged, and overridable (app/quant/woq.py).
    torchao  nn.Linear modules whose weight is a torchao tensor subclass (optional: `lanner[torchao]`).
    ipex     Intel Extension for PyTorch's WeightOnlyQuantizedLinear (optional; IPEX 2.8 needs torch 2.8
             exactly, so it runs only in an environment of its own: scripts/ipex-env.sh).

Every backend builds its modules from the same portable `QuantizedWeight` that both load paths produce
(quantize-at-load and a pre-quantized checkpoint): the int8/int4 values, scales and zero points are
Lanner's on every backend, and a backend only supplies the kernel.  That is why `lanner quantize` has no
backend option -- a checkpoint stores portable tensors and serves on any backend.

A backend's library is imported only when a model asks for it, inside the model's worker process, and
its version is checked first; anything missing or incompatible raises `WoqBackendUnavailable` with what to
install, which the loader turns into the server's ModelLoadError ("model failed to load"), never an
ImportError at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from torch import nn

if TYPE_CHECKING:
    from app.quant.isa import CpuIsa
    from app.quant.woq import QuantizedWeight

OPTIONAL_BACKENDS = ("torchao", "ipex")


class WoqBackendUnavailable(Exception):
    """The configured WOQ backend cannot run in this environment (library missing or incompatible)."""


class WoqBackend(Protocol):
    name: str

    def build(self, qw: QuantizedWeight) -> nn.Module:
        """The backend's module for one portable quantized weight (fp32 in, fp32 out)."""

    def describe(self, used: Iterable[str]) -> str:
        """The kernel path for logs and the model-info metric (`used`: the modes present, int8/int4)."""

    def nbytes(self, module: nn.Module, qw: QuantizedWeight) -> int:
        """Bytes the module holds for its weight, scales, zeros and bias."""


def load_backend(name: str, mode: str, isa: CpuIsa) -> WoqBackend:
    """The optional backend `name`, its library checked and imported now (WoqBackendUnavailable if not
    possible).  `mode` is the model's quantization mode (int8|int4)."""
    if name == "torchao":
        from app.quant.backends.torchao_backend import TorchaoBackend

        return TorchaoBackend.load(mode, isa)
    if name == "ipex":
        from app.quant.backends.ipex_backend import IpexBackend

        return IpexBackend.load(mode, isa)
    raise ValueError(f"unknown WOQ backend {name!r} (native is built into app/quant/woq.py)")


def tensor_nbytes(*tensors: object) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


__all__ = ["OPTIONAL_BACKENDS", "WoqBackend", "WoqBackendUnavailable", "load_backend", "tensor_nbytes"]
