"""Falcon-family decoder over a flat varlen batch, with its KV in a slot cache.

Same step algorithm as llama.py (flat [T, hidden] batch, one fused QKV Linear, rope at per-token
positions, `KVCache.attend` for the per-sequence attention, head only on each input's last token); the
differences are in the layer:

    falcon-7b  (multi_query, parallel_attn):   h = ln(x);            x = x + attn(h) + mlp(h)
    falcon-40b (new_decoder_architecture):     x = x + attn(ln_attn(x)) + mlp(ln_mlp(x))
                                               (one shared norm when num_ln_in_parallel_attn == 1)
    sequential (parallel_attn=False):          x = x + attn(ln(x));  x = x + mlp(ln2(x))

with LayerNorm (weight and bias), an MLP `dense_4h_to_h(gelu(dense_h_to_4h(h)))` and an optional bias on
every Linear (`config.bias`). Rotary only: ALiBi checkpoints are refused.

KV heads: 1 for multi_query (7b), `num_kv_heads` for the new architecture (40b), all heads otherwise.
The checkpoint's fused `query_key_value` rows are permuted at load into this module's [q | k | v] order:
    7b  multi_query: [q_0 .. q_{H-1}, k, v]               already in order
    40b grouped:     per KV group g: [q_g0 .. q_g(n-1), k_g, v_g]  (queries interleaved with their k, v)
    old multi-head:  per head h: [q_h, k_h, v_h]
Query head h uses KV head h // (H / n_kv) in every layout, as `KVCache.attend` assumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from app.models import stack
from app.models.arch import (  # noqa: F401 - re-exported
    PARALLEL,
    PARALLEL_TWO_NORMS,
    SEQUENTIAL,
    falcon_layout,
    falcon_num_kv_heads,
)
from app.models.kv_cache import BatchMeta, KVCache
from app.models.llama import (
    Reader,
    UnsupportedModelError,
    output_head_reader,
    read,
    state_from_readers,
)

ACTIVATIONS = MappingProxyType({
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
})



class FalconLayer(nn.Module):
    def __init__(self, config, layout: str, num_kv_heads: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.layout = layout
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = num_kv_heads * self.head_dim
        self.eps = config.layer_norm_epsilon
        ffn = getattr(config, "ffn_hidden_size", None) or 4 * hidden
        self.ln_attn = nn.LayerNorm(hidden, eps=self.eps)
        self.ln_mlp = nn.LayerNorm(hidden, eps=self.eps) if layout != PARALLEL else None
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=config.bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=config.bias)
        self.up_proj = nn.Linear(hidden, ffn, bias=config.bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]

    def attention(self, h: torch.Tensor, layer: int, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        # h: [T, H] -> [T, H]
        q = kv.store(layer, self.qkv_proj(h), meta, self.num_heads)  # rope; K/V into the cache
        return self.o_proj(kv.attend(layer, q, meta))

    def forward(self, x: torch.Tensor, layer: int, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        h = self.ln_attn(x)
        if self.layout == SEQUENTIAL:
            x = x + self.attention(h, layer, meta, kv)
            return x + self.down_proj(self.act(self.up_proj(self.ln_mlp(x))))
        h_mlp = h if self.layout == PARALLEL else self.ln_mlp(x)
        attn = self.attention(h, layer, meta, kv)
        return x + (self.down_proj(self.act(self.up_proj(h_mlp))) + attn)


class FalconDecoder(nn.Module):
    arch = "falcon"

    def __init__(self, config) -> None:
        super().__init__()
        layout = falcon_layout(config)
        if config.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"Falcon activation {config.activation!r} is not supported")
        if config.hidden_size % config.num_attention_heads:
            raise UnsupportedModelError("Falcon hidden_size must be divisible by num_attention_heads")
        self.config = config
        self.layout = layout
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = falcon_num_kv_heads(config)
        if config.num_attention_heads % self.num_kv_heads:
            raise UnsupportedModelError("Falcon num_attention_heads must be a multiple of num_kv_heads")
        self.vocab_size = config.vocab_size
        # no random init (see llama.py)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(FalconLayer(config, layout, self.num_kv_heads)
                                    for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.stack_cache = stack.StackCache()  # app/models/stack.py: all layers in one C++ call

    def forward(self, input_ids: torch.Tensor, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        # input_ids: [T] -> logits [B, V] fp32 of the rows meta.logit_rows
        x = self.embed_tokens(input_ids)
        x = stack.run_layers(self, x, meta, kv)  # the C++ stack, or the layers above one by one
        return self.lm_head(self.ln_f(x.index_select(0, meta.logit_rows))).float()


def _qkv_rows_to_q_k_v(fused: torch.Tensor, config, num_kv_heads: int) -> torch.Tensor:
    """Permute the fused query_key_value rows (weight [out, in] or bias [out]) into [q | k | v] order."""
    heads, hd = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    tail = fused.shape[1:]
    if config.new_decoder_architecture:
        group = heads // num_kv_heads
        rows = fused.reshape(num_kv_heads, group + 2, hd, *tail)
        parts = (rows[:, :group], rows[:, group], rows[:, group + 1])
    elif config.multi_query:
        return fused  # [q_0..q_{H-1}, k, v] already
    else:
        rows = fused.reshape(heads, 3, hd, *tail)
        parts = (rows[:, 0], rows[:, 1], rows[:, 2])
    return torch.cat([p.reshape(-1, *tail) for p in parts])


def falcon_state_dict(config, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map transformers' FalconForCausalLM weight names to FalconDecoder's, as fp32 (QKV rows permuted)."""
    falcon_layout(config)  # refuses unsupported layouts before any weight is read
    readers = falcon_global_readers(config)
    for i in range(config.num_hidden_layers):
        readers.update(falcon_layer_readers(config, i))
    return state_from_readers(readers, weights, bool(getattr(config, "tie_word_embeddings", False)))


def falcon_global_readers(config) -> dict[str, Reader]:
    """The tensors outside the decoder layers: embedding, final LayerNorm, output head."""
    embed = "transformer.word_embeddings.weight"
    return {"embed_tokens.weight": read(embed),
            "ln_f.weight": read("transformer.ln_f.weight"), "ln_f.bias": read("transformer.ln_f.bias"),
            "lm_head.weight": output_head_reader(config, embed, "lm_head.weight")}


def falcon_layer_readers(config, i: int) -> dict[str, Reader]:
    """Decoder layer i's tensors, named as in FalconDecoder (`layers.{i}.`), QKV rows in [q | k | v] order."""
    layout = falcon_layout(config)
    num_kv = falcon_num_kv_heads(config)
    norms = {PARALLEL: {"ln_attn": "input_layernorm"},
             PARALLEL_TWO_NORMS: {"ln_attn": "ln_attn", "ln_mlp": "ln_mlp"},
             SEQUENTIAL: {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm"}}[layout]
    linears = {"qkv_proj": "self_attention.query_key_value", "o_proj": "self_attention.dense",
               "up_proj": "mlp.dense_h_to_4h", "down_proj": "mlp.dense_4h_to_h"}
    src, dst = f"transformer.h.{i}.", f"layers.{i}."
    readers: dict[str, Reader] = {}
    for ours, theirs in norms.items():
        readers[f"{dst}{ours}.weight"] = read(f"{src}{theirs}.weight")
        readers[f"{dst}{ours}.bias"] = read(f"{src}{theirs}.bias")
    for ours, theirs in linears.items():
        for kind in ("weight", "bias") if config.bias else ("weight",):
            plain = read(f"{src}{theirs}.{kind}")
            readers[f"{dst}{ours}.{kind}"] = (
                (lambda w, plain=plain: _qkv_rows_to_q_k_v(plain(w), config, num_kv)) if ours == "qkv_proj"
                else plain)
    return readers
