"""The `torchao` WOQ backend: nn.Linear modules whose weight is a torchao quantized tensor subclass.

The tensors are built from Lanner's own quantized values (no re-quantizing):
    int8  torchao.quantization.Int8Tensor, per row: qdata = q [N, K] int8, scale [N, 1], block (1, K)
    int4  torchao.quantization.IntxUnpackedToInt8Tensor, groups of G: qdata = q - 8 [N, K] int8 in
          [-8, 7], scale s [N, K/G], zero point -z/s (fp32), block (1, G); torchao dequantizes
          (qdata - zero_point) * scale = (q - 8) * s + z, Lanner's int4 convention.
F.linear on such a weight goes to torchao's own dispatch.  What torchao 0.18 does there on CPU (read in
its source and measured): the int8 weight-only path casts the whole int8 weight to the activation dtype
and runs torch.mm on every call; the intx path dequantizes the whole weight on every call.  So this
backend is correct but not fast on CPUs (measured on the 2-core Zen 3, 2048 -> 5632 at M=1: torchao int8
~100 ms per call vs 0.47 ms for the native packed kernel); it exists to compare against and for machines
where torchao has better CPU kernels.  torchao 0.18's Int4WeightOnlyConfig has no CPU path at all (plain
format needs the CUDA-only mslk package, tile-packed needs bf16 and CUDA's tinygemm, plain-int32 is XPU),
which is why int4 uses the intx tensor.

The constructors used are torchao's tensor-subclass constructors (checked against torchao 0.18); a torchao
without them is refused at load with the version to install.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from app.quant.backends import WoqBackendUnavailable, tensor_nbytes
from app.quant.isa import CpuIsa
from app.quant.woq import QuantizedWeight, unpack_nibbles

log = logging.getLogger("lanner.quant")

INSTALL_HINT = "pip install 'lanner[torchao]' (torchao>=0.18)"
REQUIRED = ("Int8Tensor", "IntxUnpackedToInt8Tensor")


def import_torchao():
    """torchao.quantization, or WoqBackendUnavailable saying what to install."""
    if importlib.util.find_spec("torchao") is None:
        raise WoqBackendUnavailable("woq_backend=torchao needs the torchao package, which is not "
                                    f"installed: {INSTALL_HINT}; or use woq_backend: native.")
    try:
        import torchao
        import torchao.quantization as tq
    except Exception as exc:  # noqa: BLE001 -- a broken install can fail in any way
        raise WoqBackendUnavailable(f"woq_backend=torchao: importing torchao failed with torch "
                                    f"{torch.__version__} ({type(exc).__name__}: {exc}); "
                                    f"{INSTALL_HINT}.") from exc
    missing = [name for name in REQUIRED if not hasattr(tq, name)]
    if missing:
        version = getattr(torchao, "__version__", "?")
        raise WoqBackendUnavailable(f"woq_backend=torchao: torchao {version} lacks "
                                    f"torchao.quantization.{', '.join(missing)}; {INSTALL_HINT}.")
    return torchao, tq


class TorchaoLinear(nn.Linear):
    """An nn.Linear whose weight is a torchao tensor subclass (named for logs and module listings)."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={type(self.weight).__name__}"


@dataclass
class TorchaoBackend:
    version: str
    tq: object  # torchao.quantization
    name: str = "torchao"

    @classmethod
    def load(cls, mode: str, isa: CpuIsa) -> TorchaoBackend:
        torchao, tq = import_torchao()
        return cls(str(getattr(torchao, "__version__", "?")), tq)

    @torch.no_grad()
    def build(self, qw: QuantizedWeight) -> nn.Module:
        n, k = qw.out_features, qw.in_features
        if qw.mode == "int8":
            scale = qw.scales.float().reshape(n, 1).contiguous()
            weight = self.tq.Int8Tensor(qw.qweight.contiguous(), scale, [1, k], torch.float32)
        else:
            assert qw.zeros is not None and qw.group_size is not None
            g = qw.group_size
            q = unpack_nibbles(qw.qweight).to(torch.int8).sub_(8)
            scales = qw.scales.float().contiguous()
            zero_point = (qw.zeros.float() - 8.0).contiguous()  # on q - 8: w = (q - 8 - (z - 8)) * s
            weight = self.tq.IntxUnpackedToInt8Tensor(q, scales, zero_point, torch.int4, (1, g),
                                                      torch.float32, None)
        with torch.device("meta"):
            module = TorchaoLinear(k, n, bias=qw.bias is not None)
        module.weight = nn.Parameter(weight, requires_grad=False)
        if qw.bias is not None:
            module.bias = nn.Parameter(qw.bias.float().contiguous(), requires_grad=False)
        return module

    def describe(self, used: Iterable[str]) -> str:
        kinds = {"int8": "int8 Int8Tensor", "int4": "int4 IntxUnpackedToInt8Tensor"}
        paths = ", ".join(kinds[m] for m in ("int4", "int8") if m in set(used))
        return f"torchao {self.version}: {paths} (F.linear via torchao dispatch: weight dequantized per call)"

    def nbytes(self, module: nn.Module, qw: QuantizedWeight) -> int:
        w = module.weight
        return tensor_nbytes(getattr(w, "qdata", None), getattr(w, "scale", None),
                             getattr(w, "zero_point", None), module.bias)
