"""What a Llama or Falcon config means for Lanner's decoders, in plain Python (no torch): read by the torch
decoders (llama.py, falcon.py) and by the torch-free worker's model (app/lite/model.py) alike."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


class UnsupportedModelError(ValueError):
    """The checkpoint uses a feature this implementation does not support (message says which)."""


PARALLEL, PARALLEL_TWO_NORMS, SEQUENTIAL = "parallel", "parallel_two_norms", "sequential"
# How the C++ layer stacks (decoder_stack.cpp for the torch runner, lite.cpp for the torch-free one) encode a
# Falcon layout and activation
STACK_LAYOUTS = {SEQUENTIAL: 0, PARALLEL: 1, PARALLEL_TWO_NORMS: 2}
STACK_FALCON_ACTS = {"gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2, "relu": 3}


def rope_parameters(config) -> dict:
    """The config's rope dict in transformers-5 form ({'rope_type', 'rope_theta', ...})."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # pre-v5 style config
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_settings(config) -> tuple[dict, float]:
    """The config's rope parameters and base (theta), refusing partial rotary embeddings."""
    params = rope_parameters(config)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are unsupported")
    return params, float(params["rope_theta"])


def scaled_inv_freq(inv_freq: Any, params: dict, where: Callable[[Any, Any, Any], Any]) -> Any:
    """The default inverse frequencies scaled for the rope type (default, linear, llama3), as transformers
    scales them: `inv_freq` a torch tensor with `where` torch.where (llama.py), or a numpy array with
    np.where (the torch-free worker), computed by the same operations."""
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return where(medium, smoothed, scaled)
    raise UnsupportedModelError(f"RoPE type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_inv_freq_np(config, head_dim: int) -> np.ndarray:
    """llama.py's `rope_inv_freq` in numpy fp32, for the torch-free worker (fp32 rounding of the power may
    differ from torch's in the last bit)."""
    params, base = rope_settings(config)
    inv_freq = (np.float32(1.0) / np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                                       / np.float32(head_dim))).astype(np.float32)
    return np.asarray(scaled_inv_freq(inv_freq, params, np.where), dtype=np.float32)


def rope_tables_np(inv_freq: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.py's `rope_tables` in numpy: cos, signed sin [max_len, head_dim] fp32 (sin's first half negated)."""
    freqs = np.arange(max_len, dtype=np.int64).astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate((freqs, freqs), axis=-1)
    sin = np.sin(emb)
    sin[:, :inv_freq.size] *= -1
    return np.cos(emb), sin


def falcon_layout(config) -> str:
    """Which residual layout the config describes (refusing the ones transformers cannot run either)."""
    if getattr(config, "alibi", False):
        raise UnsupportedModelError(
            "Falcon checkpoints with ALiBi position biases (alibi=true) are not supported; "
            "only rotary-embedding Falcon models (falcon-7b/40b/180b style) can be served."
        )
    if config.new_decoder_architecture:
        if not config.parallel_attn:
            raise UnsupportedModelError(
                "Falcon new_decoder_architecture with parallel_attn=false is not supported")
        num_ln = getattr(config, "num_ln_in_parallel_attn", None) or 2
        return PARALLEL_TWO_NORMS if num_ln == 2 else PARALLEL
    return PARALLEL if config.parallel_attn else SEQUENTIAL


def falcon_num_kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return int(config.num_kv_heads)
    return 1 if config.multi_query else int(config.num_attention_heads)


def llama_head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
