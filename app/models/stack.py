"""All decoder layers of a step in one C++ call (app/quant/csrc/decoder_stack.cpp) where the kernels build.

The Python layers (llama.py, falcon.py) call ~10 C++ ops per layer; between them a decode step of the
TinyLlama-1.1B shape spent 2.5-5 ms of ~27 in Python (module calls, views, small tensors).  `DecoderStack`
holds references to every layer's tensors, built once per (model, KV cache), and `forward` runs the same
ops in the same order in C++, so the hidden states equal the Python layers' bit for bit
(tests/model/test_parity.py `test_decoder_stack_equals_python_layers`).  A model gets a stack only when
every Linear in its layers is one of Lanner's own-kernel modules (TiledInt8Linear, TiledInt4Linear) or a
plain fp32 nn.Linear; other WOQ backends (ATen's packed kernels, torchao, IPEX) keep the Python layers.
LANNER_DECODER_STACK=0 (or false/no/off) turns it off (for comparisons).

Encoding (what the C++ constructor reads), per layer, in order:
    tensors: for each Linear of (qkv, o, up or gate|up, down): weight, scales, zeros, bias;
             then norm 1 weight, bias; norm 2 weight, bias; K cache, V cache      (22; empty = None)
    ints:    for each Linear: kind (0 fp32, 1 int8, 2 int4), group size, out_features  (12)
after a header of ints: norm (0 RMSNorm, 1 LayerNorm), layout (0 sequential, 1 parallel, 2 parallel with
two norms), activation (0 SiLU-gated, 1 GELU, 2 GELU tanh, 3 ReLU), heads, KV heads, head dim, the
gated MLP's intermediate size, layers.
"""

from __future__ import annotations

import torch
from torch import nn

from app.models import ops
from app.models.arch import STACK_FALCON_ACTS, STACK_LAYOUTS
from app.models.kv_cache import BatchMeta, KVCache
from app.quant import kernels
from app.quant.woq import TiledInt4Linear, TiledInt8Linear

ENABLE_ENV = "LANNER_DECODER_STACK"
_NONE = torch.empty(0)


def enabled() -> bool:
    return not kernels.switched_off(ENABLE_ENV) and ops.own_ops()


def _linear(module: nn.Module) -> tuple[list[torch.Tensor], list[int]] | None:
    bias = getattr(module, "bias", None)
    bias = _NONE if bias is None else bias
    if isinstance(module, TiledInt8Linear):
        return [module.weight, module.scales, _NONE, bias], [1, 0, module.out_features]
    if isinstance(module, TiledInt4Linear):
        return [module.weight, module.scales, module.zeros, bias], [2, module.group_size, module.out_features]
    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        return [module.weight, _NONE, _NONE, bias], [0, 0, module.out_features]
    return None


def why_not(model: nn.Module) -> str:
    """Why `model` runs without a stack (for the load log)."""
    if kernels.switched_off(ENABLE_ENV):
        return f"{ENABLE_ENV}=0"
    if not ops.own_ops():
        return "Lanner's kernels are not built"
    kinds = sorted({type(m).__name__ for layer in model.layers for m in layer.modules()
                    if hasattr(m, "in_features") and _linear(m) is None})
    return f"Linear modules the stack cannot run: {', '.join(kinds)}" if kinds else "unsupported activation"


def build(model: nn.Module, kv: KVCache):
    """The stack of `model`'s layers over `kv`'s caches, or None when a layer cannot run in it."""
    layers = list(model.layers)
    first = layers[0]
    if model.arch == "llama":
        header = [0, 0, 0, first.num_heads, first.num_kv_heads, first.head_dim, first.inter]
        parts = [((l.qkv_proj, l.o_proj, l.gate_up_proj, l.down_proj),
                  (l.input_norm, None, l.post_attn_norm, None)) for l in layers]
    elif model.arch == "falcon":
        act = STACK_FALCON_ACTS.get(model.config.activation)
        if act is None:
            return None
        header = [1, STACK_LAYOUTS[first.layout], act, first.num_heads, first.num_kv_heads, first.head_dim, 0]
        parts = [((l.qkv_proj, l.o_proj, l.up_proj, l.down_proj),
                  (l.ln_attn.weight, l.ln_attn.bias,
                   *((l.ln_mlp.weight, l.ln_mlp.bias) if l.ln_mlp is not None else (None, None))))
                 for l in layers]
    else:
        return None
    tensors: list[torch.Tensor] = []
    ints = [*header, len(layers)]
    for i, (linears, norms) in enumerate(parts):
        for module in linears:
            enc = _linear(module)
            if enc is None:
                return None
            tensors += enc[0]
            ints += enc[1]
        tensors += [_NONE if t is None else t.detach() for t in norms]
        tensors += [kv.k[i], kv.v[i]]
    return torch.classes.lanner.DecoderStack(tensors, ints, float(first.eps))


def forward(stack, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
    # x: [T, H] embeddings -> [T, H] after every layer (prompt chunks attend with KVCache.plan's masks)
    spans = [v for s in meta.prefills for v in (s.offset, s.length, s.slot, s.kv_len)]
    return torch.ops.lanner.decoder_stack(stack, x, meta.cos, meta.sin, meta.slot_ids, meta.positions,
                                          meta.num_decode, spans, [s.mask for s in meta.prefills])


class StackCache:
    """A decoder's stack, built on first use for the KV cache it is called with (None: Python layers)."""

    def __init__(self) -> None:
        self._kv: KVCache | None = None
        self._stack = None

    def get(self, model: nn.Module, kv: KVCache):
        if self._kv is not kv:
            self._kv, self._stack = kv, build(model, kv) if enabled() else None
        return self._stack


def run_layers(model: nn.Module, x: torch.Tensor, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
    """x [T, H] through every layer of `model` (its `stack_cache`'s stack, else the Python layers)."""
    stack = model.stack_cache.get(model, kv)
    if stack is not None:
        return forward(stack, x, meta)
    for i, layer in enumerate(model.layers):
        x = layer(x, i, meta, kv)
    return x
