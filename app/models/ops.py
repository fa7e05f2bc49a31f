"""The decoder's per-layer work around the matmuls: Lanner's C++ ops when the kernels library is built.

`rms_norm`, `rope_store` (RoPE on the queries and keys of a fused QKV output, then the keys and values
written to the KV cache) and `decode_attention` (single-token rows over their own cached keys) run as one
call each from app/quant/csrc/decoder_ops.cpp, built with the WOQ kernels (app/quant/kernels.py).  Where
that library is unavailable (no C++ compiler, LANNER_OWN_KERNELS=0) they run as the equivalent ATen ops
(masked SDPA for the attention, in app/models/kv_cache.py), which the tests also compare them with.  Why:
a decode step of the TinyLlama-1.1B shape spent ~5 ms outside its matmuls: ~45 RMSNorms at ~20 us each
(ATen's CPU rms_norm is six ops), 22 x 8 small rope / index_put ops, 22 SDPA calls of 35-80 us.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from app.quant import kernels


@cache
def own_ops() -> bool:
    """Whether the C++ ops are in use in this process (builds the kernels library on the first call)."""
    return kernels.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H] -> [T, H]
    if own_ops() and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.ops.lanner.rms_norm(x.contiguous(), weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim], cos/sin: [T, 1, head_dim] -> [T, heads, head_dim]
    # (sin with its first half negated, so rotate_half(x) * sin == roll(x, d/2) * signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def rope_store(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, num_heads: int,
               num_kv_heads: int) -> torch.Tensor:
    """qkv: [T, (nh + 2 nkv) d], rows [q heads | k heads | v heads] -> the rotated queries [T, nh, d].

    Writes the rotated keys and the values of every row to k_cache / v_cache [slots, nkv, max_len, d] at
    (slots[t], :, positions[t]).  The C++ op rotates the queries in place inside qkv."""
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    q_size, kv_size = num_heads * d, num_kv_heads * d
    if own_ops() and qkv.is_contiguous() and k_cache.dtype in (torch.float32, torch.bfloat16):
        torch.ops.lanner.rope_store(qkv, cos, sin, k_cache, v_cache, slots, positions, num_heads, num_kv_heads)
        return qkv[:, :q_size].view(t, num_heads, d)
    q = apply_rope(qkv[:, :q_size].view(t, num_heads, d), cos, sin)
    k = apply_rope(qkv[:, q_size:q_size + kv_size].view(t, num_kv_heads, d), cos, sin)
    k_cache[slots, :, positions] = k.to(k_cache.dtype)  # a bf16 cache: rounded to nearest even
    v_cache[slots, :, positions] = qkv[:, q_size + kv_size:].view(t, num_kv_heads, d).to(v_cache.dtype)
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Single-token rows, each attending positions 0..positions[r] of its slot (Lanner's C++ op; the ATen
    path is the masked SDPA in app/models/kv_cache.py).  q: [R, nh, d] -> [R, nh * d]; the nh / nkv query
    heads of a KV head are adjacent, as in transformers' grouped-query attention."""
    return torch.ops.lanner.decode_attention(q, k_cache, v_cache, slots, positions, q.shape[-1] ** -0.5)
