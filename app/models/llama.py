"""Llama-family decoder over a flat varlen batch, with its KV in a slot cache.

Algorithm (one step, see runner.py for how the batch is laid out)
-----------------------------------------------------------------
All tokens fed in this step, by every sequence, are concatenated into one [T, hidden] matrix, so each
weight matrix is read once per layer for the whole batch (that is where batching pays on a CPU):

    x = embed(ids)                                            # [T, H]
    per layer:
        h = rms_norm(x)
        q = kv.store(layer, qkv_proj(h))                      # one fused Linear (q | k | v rows); rope at
                                                              # each token's position, K/V into the cache
        x = x + o_proj(kv.attend(layer, q))                   # attends per sequence
        x = x + down(silu(gate) * up), gate|up = gate_up(rms_norm(x))   # one fused Linear
    logits = lm_head(rms_norm(x[last token of each input]))  # only B rows reach the head

Supported: grouped-query attention, explicit `head_dim`, attention/MLP bias flags, tied or untied head,
RoPE of type default, `linear` and `llama3` (others are refused). Linear layers stay `torch.nn.Linear`
modules so a weight-only-quantization pass can swap them in one place. The rope tables here are shared
with falcon.py; RMSNorm and RoPE + KV store run as Lanner's C++ ops where built (app/models/ops.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from app.models import ops, stack
from app.models.arch import (  # noqa: F401 - UnsupportedModelError, rope_parameters: re-exported
    UnsupportedModelError,
    llama_head_dim,
    rope_parameters,
    rope_settings,
    scaled_inv_freq,
)
from app.models.kv_cache import BatchMeta, KVCache


# --------------------------------------------------------------------------- rope (shared with falcon)


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] fp32, as transformers computes them for default/linear/llama3."""
    params, base = rope_settings(config)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return scaled_inv_freq(inv_freq, params, torch.where)


def rope_tables(inv_freq: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin tables [max_len, head_dim] for app/models/ops.py's rope (`apply_rope`, `rope_store`).

    The sin table has its first half negated, so rotate_half(x) * sin == roll(x, d/2) * signed_sin.
    """
    freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    half = inv_freq.numel()
    sin = emb.sin()
    sin[:, :half].neg_()
    return emb.cos(), sin


# --------------------------------------------------------------------------- model


ACTIVATIONS = MappingProxyType({"silu": F.silu, "swish": F.silu})


class LlamaLayer(nn.Module):
    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.eps = config.rms_norm_eps
        attn_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.post_attn_norm = nn.Parameter(torch.ones(hidden))
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=attn_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=attn_bias)
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=mlp_bias)
        self.inter = inter
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, layer: int, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        h = ops.rms_norm(x, self.input_norm, self.eps)
        q = kv.store(layer, self.qkv_proj(h), meta, self.num_heads)  # rope; K/V into the cache
        x = x + self.o_proj(kv.attend(layer, q, meta))
        h = ops.rms_norm(x, self.post_attn_norm, self.eps)
        gate_up = self.gate_up_proj(h)
        return x + self.down_proj(self.act(gate_up[:, :self.inter]) * gate_up[:, self.inter:])


class LlamaDecoder(nn.Module):
    arch = "llama"

    def __init__(self, config) -> None:
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"Llama activation {config.hidden_act!r} is not supported")
        self.config = config
        self.head_dim = llama_head_dim(config)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        # a given (uninitialised) table: the weights are always loaded, and Embedding's own random init on
        # the meta device imports torch._dynamo (800 modules, ~68 MiB resident in every worker)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(LlamaLayer(config, self.head_dim)
                                    for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.stack_cache = stack.StackCache()  # app/models/stack.py: all layers in one C++ call

    def forward(self, input_ids: torch.Tensor, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        # input_ids: [T] -> logits [B, V] fp32 of the rows meta.logit_rows
        x = self.embed_tokens(input_ids)
        x = stack.run_layers(self, x, meta, kv)  # the C++ stack, or the layers above one by one
        x = ops.rms_norm(x.index_select(0, meta.logit_rows), self.norm, self.eps)
        return self.lm_head(x).float()


# A reader makes one decoder tensor from the checkpoint's (lazy) name -> tensor mapping, in the source
# dtype: a plain lookup, or a fusion of several.  Building a model reads all of them (`state_from_readers`);
# the streaming quantizer (app/quant/checkpoint.py) reads one Linear at a time.
Reader = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def read(name: str) -> Reader:
    return lambda weights: weights[name]


class read_cat:  # a Reader, named like `read`
    """Rows of several tensors, concatenated; `parts` lets a row-wise consumer (the quantizer) read them
    one at a time instead of materializing the fused matrix."""

    def __init__(self, *names: str) -> None:
        self.parts = tuple(read(n) for n in names)

    def __call__(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([part(weights) for part in self.parts])


def state_from_readers(readers: Mapping[str, Reader], weights: Mapping[str, torch.Tensor],
                       tied: bool) -> dict[str, torch.Tensor]:
    """Run every reader, as fp32; a tied head is the embedding itself (no second copy)."""
    sd: dict[str, torch.Tensor] = {}
    for name, reader in readers.items():
        if name == "lm_head.weight" and tied:
            sd[name] = sd["embed_tokens.weight"]
        else:
            sd[name] = reader(weights).to(torch.float32)
    return sd


def llama_state_dict(config, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map (and fuse) transformers' LlamaForCausalLM weight names to LlamaDecoder's, as fp32.

    `weights` may be lazy (one tensor read per lookup); each source tensor is read once and the fused
    result is the only copy kept.
    """
    readers = llama_global_readers(config)
    for i in range(config.num_hidden_layers):
        readers.update(llama_layer_readers(config, i))
    return state_from_readers(readers, weights, bool(getattr(config, "tie_word_embeddings", False)))


def llama_global_readers(config) -> dict[str, Reader]:
    """The tensors outside the decoder layers: embedding, final norm, output head."""
    return {"embed_tokens.weight": read("model.embed_tokens.weight"), "norm": read("model.norm.weight"),
            "lm_head.weight": output_head_reader(config, "model.embed_tokens.weight", "lm_head.weight")}


def llama_layer_readers(config, i: int) -> dict[str, Reader]:
    """Decoder layer i's tensors, named as in LlamaDecoder (`layers.{i}.`), q/k/v and gate/up fused."""
    src, dst = f"model.layers.{i}.", f"layers.{i}."
    attn = [src + f"self_attn.{p}_proj" for p in "qkv"]
    gate_up = [src + f"mlp.{p}_proj" for p in ("gate", "up")]
    readers = {dst + "input_norm": read(src + "input_layernorm.weight"),
               dst + "post_attn_norm": read(src + "post_attention_layernorm.weight"),
               dst + "qkv_proj.weight": read_cat(*(n + ".weight" for n in attn)),
               dst + "o_proj.weight": read(src + "self_attn.o_proj.weight"),
               dst + "gate_up_proj.weight": read_cat(*(n + ".weight" for n in gate_up)),
               dst + "down_proj.weight": read(src + "mlp.down_proj.weight")}
    if getattr(config, "attention_bias", False):
        readers[dst + "qkv_proj.bias"] = read_cat(*(n + ".bias" for n in attn))
        readers[dst + "o_proj.bias"] = read(src + "self_attn.o_proj.bias")
    if getattr(config, "mlp_bias", False):
        readers[dst + "gate_up_proj.bias"] = read_cat(*(n + ".bias" for n in gate_up))
        readers[dst + "down_proj.bias"] = read(src + "mlp.down_proj.bias")
    return readers


def output_head_reader(config, embedding: str, name: str) -> Reader:
    """The output head weight: the embedding when tied, else the checkpoint's `name`."""
    if getattr(config, "tie_word_embeddings", False):
        return read(embedding)

    def head(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if name not in weights:
            raise UnsupportedModelError(f"untied model without an output head weight {name!r}")
        return weights[name]
    return head
