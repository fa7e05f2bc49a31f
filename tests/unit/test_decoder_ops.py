"""Lanner's C++ decoder ops (app/quant/csrc/decoder_ops.cpp through app/models/ops.py) against the ATen
ops they replace: RMSNorm, and RoPE on a fused QKV output with the keys and values stored in the KV cache
(fp32 or bf16), and the decode attention over it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.models import ops
from app.models.llama import rope_tables

needs_ops = pytest.mark.skipif(not ops.own_ops(), reason="Lanner's kernels library is not built here")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@needs_ops
@pytest.mark.parametrize("rows,width", [(1, 64), (3, 2048), (40, 100), (0, 16)])
def test_rms_norm_matches_aten(rows, width):
    x = torch.randn(rows, width, generator=gen(rows)) * 3
    w = torch.randn(width, generator=gen(width))
    ours = torch.ops.lanner.rms_norm(x, w, 1e-5)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, F.rms_norm(x, (width,), w, 1e-5), rtol=1e-5, atol=1e-6)


KV_DTYPES = [torch.float32, torch.bfloat16]


def aten_rope_store(qkv, kc, vc, cos, sin, slots, pos, nh, nkv):
    t, d = qkv.shape[0], kc.shape[-1]
    q = ops.apply_rope(qkv[:, :nh * d].view(t, nh, d), cos, sin)
    kc[slots, :, pos] = ops.apply_rope(qkv[:, nh * d:(nh + nkv) * d].view(t, nkv, d), cos, sin).to(kc.dtype)
    vc[slots, :, pos] = qkv[:, (nh + nkv) * d:].view(t, nkv, d).to(vc.dtype)
    return q


@needs_ops
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("nh,nkv,d", [(8, 2, 16), (4, 1, 32), (4, 4, 8)])
def test_rope_store_matches_aten(nh, nkv, d, dtype):
    """Queries rotated in place, keys rotated into the cache, values copied, at each row's own slot and
    position (decode rows of several slots and a prompt chunk at positions 5..9 in one batch)."""
    cos_t, sin_t = rope_tables(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), 64)
    slots = torch.tensor([0, 2, 1, 1, 1, 1, 1])
    pos = torch.tensor([17, 3, 5, 6, 7, 8, 9])
    cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)
    qkv = torch.randn(len(pos), (nh + 2 * nkv) * d, generator=gen(d))
    caches = [torch.randn(3, nkv, 64, d, generator=gen(i)).to(dtype) for i in range(2)]
    ref_k, ref_v = caches[0].clone(), caches[1].clone()
    ref_q = aten_rope_store(qkv.clone(), ref_k, ref_v, cos, sin, slots, pos, nh, nkv)
    ours = qkv.clone()
    k, v = caches[0].clone(), caches[1].clone()
    q = ops.rope_store(ours, k, v, cos, sin, slots, pos, nh, nkv)
    assert k.dtype == v.dtype == dtype
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    # bf16: both round the fp32 key to nearest even; a key whose fp32 differs in its last bit (FMA) may
    # round one bf16 step apart
    torch.testing.assert_close(k.float(), ref_k.float(), rtol=1e-6 if dtype == torch.float32 else 2**-7,
                               atol=1e-6)
    assert torch.equal(v, ref_v)  # values: the same conversion of the same fp32
    assert torch.equal(ours[:, nh * d:], qkv[:, nh * d:])  # only the queries change inside qkv


@needs_ops
def test_rope_store_refuses_out_of_range_rows_before_writing():
    nh, nkv, d = 2, 1, 8
    cos_t, sin_t = rope_tables(torch.ones(d // 2), 16)
    qkv = torch.randn(2, (nh + 2 * nkv) * d)
    k, v = torch.zeros(2, nkv, 16, d), torch.zeros(2, nkv, 16, d)
    for slots, pos in ((torch.tensor([0, 2]), torch.tensor([0, 1])), (torch.tensor([0, 1]), torch.tensor([3, 16]))):
        with pytest.raises(RuntimeError, match="out of range"):
            torch.ops.lanner.rope_store(qkv, cos_t[:2].contiguous(), sin_t[:2].contiguous(), k, v, slots, pos,
                                        nh, nkv)
        assert not k.any() and not v.any()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        torch.ops.lanner.rope_store(qkv, cos_t[:2].contiguous(), sin_t[:2].contiguous(), k, v,
                                    torch.tensor([0, 1]), torch.tensor([0, 1]), nh + 1, nkv)


@needs_ops
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("nh,nkv,d", [(32, 4, 64), (8, 8, 16), (6, 1, 12), (4, 2, 128), (4, 1, 88)])
def test_decode_attention_matches_sdpa(nh, nkv, d, dtype):
    """Rows of scattered slots with different lengths (1 to 70 keys, across the 8-key and 16-value blocks
    of the vector code, value dims in chunks of 64, 16 and 8; d = 12 takes the plain loops) against masked SDPA with grouped-query heads; a bf16
    cache against SDPA on its exact fp32 widening."""
    slots = torch.tensor([3, 0, 5, 2])
    pos = torch.tensor([0, 69, 8, 23])
    kc, vc = (torch.randn(6, nkv, 80, d, generator=gen(i)).to(dtype) for i in (1, 2))
    qkv = torch.randn(len(slots), (nh + 2 * nkv) * d, generator=gen(3))
    q = qkv[:, :nh * d].view(len(slots), nh, d)  # rows strided, as in a fused QKV output
    ours = ops.decode_attention(q, kc, vc, slots, pos)
    for r, (slot, p) in enumerate(zip(slots.tolist(), pos.tolist())):
        qr = q[r].view(1, nkv, nh // nkv, d)
        ref = F.scaled_dot_product_attention(qr, kc[slot:slot + 1, :, :p + 1].float(),
                                             vc[slot:slot + 1, :, :p + 1].float())
        torch.testing.assert_close(ours[r], ref.reshape(nh * d), rtol=1e-5, atol=1e-5)


@needs_ops
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_decode_attention_splits_query_heads_over_threads(dtype):
    """One row with one KV head (falcon-7b's multi-query layout) is a single (row, KV head) pair: its query
    heads are split over the threads instead of leaving all but one idle.  Each head's arithmetic is the
    same however the heads are split, so the result is bit-identical on 1 or 4 threads (4 parts of 2-3
    heads here), and it matches SDPA."""
    nh, d = 11, 64
    kc, vc = (torch.randn(2, 1, 40, d, generator=gen(i)).to(dtype) for i in (4, 5))
    q = torch.randn(1, nh, d, generator=gen(6))
    slots, pos = torch.tensor([1]), torch.tensor([37])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.decode_attention(q, kc, vc, slots, pos)
        torch.set_num_threads(4)
        split = ops.decode_attention(q, kc, vc, slots, pos)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, alone)
    ref = F.scaled_dot_product_attention(q.view(1, 1, nh, d), kc[1:2, :, :38].float(), vc[1:2, :, :38].float())
    torch.testing.assert_close(split[0], ref.reshape(nh * d), rtol=1e-5, atol=1e-5)
    empty = ops.decode_attention(q[:0], kc, vc, slots[:0], pos[:0])  # no decode rows: nothing to split
    assert empty.shape == (0, nh * d)


@needs_ops
def test_decode_attention_refuses_bad_rows():
    kc = torch.zeros(2, 1, 8, 16)
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.decode_attention(q, kc, kc.clone(), torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.decode_attention(q, kc, kc.clone(), torch.tensor([0]), torch.tensor([8]))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ops.decode_attention(torch.randn(1, 3, 16), torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16),
                             torch.tensor([0]), torch.tensor([0]))
    for k, v in ((kc, kc.bfloat16()), (kc.half(), kc.half())):  # mixed, or a dtype the ops do not take
        with pytest.raises(RuntimeError, match="both fp32 or both bf16"):
            ops.decode_attention(q, k, v, torch.tensor([0]), torch.tensor([0]))


@needs_ops
def test_decoder_stack_refuses_bad_encodings():
    """app/models/stack.py's encoding is checked where it is read: a wrong count of tensors or ints, a bad
    configuration or Linear kind is an error, not a crash in a later step."""
    stack_cls = torch.classes.lanner.DecoderStack
    header = [0, 0, 0, 2, 1, 16, 64, 1]  # RMSNorm, sequential, SiLU-gated, 2 heads, 1 KV head, d 16, 1 layer
    w = torch.zeros(64, 32)
    linear = [w, torch.empty(0), torch.empty(0), torch.empty(0)]
    tensors = 4 * linear + [torch.ones(32), torch.empty(0), torch.ones(32), torch.empty(0),
                            torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16)]
    ints = header + 4 * [0, 0, 64]
    stack_cls(tensors, ints, 1e-5)  # well-formed
    with pytest.raises(RuntimeError, match="tensors"):
        stack_cls(tensors[:-1], ints, 1e-5)
    with pytest.raises(RuntimeError, match="ints too short"):
        stack_cls(tensors, ints[:3], 1e-5)
    with pytest.raises(RuntimeError, match="bad configuration"):
        stack_cls(tensors, [0, 0, 0, 3, 2, 16, 64, 1] + ints[8:], 1e-5)  # 3 heads over 2 KV heads
    with pytest.raises(RuntimeError, match="bad Linear"):
        stack_cls(tensors, header + [5, 0, 64] + ints[11:], 1e-5)


def _rss_anon() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))


def test_kv_cache_memory_is_resident_only_where_written():
    """A cache sized for many full-length slots costs nothing until sequences fill it: it reads as zeros,
    writing one slot of one layer makes about that slot resident, and freeing the cache returns it."""
    from app.models.kv_cache import KVCache

    before = _rss_anon()
    cache = KVCache(num_layers=4, num_kv_heads=4, head_dim=64, max_len=2048, num_slots=8, dtype=torch.bfloat16)
    slot = 4 * 2048 * 64 * 2  # 1 MiB: one slot of one layer's keys; the whole cache is 64 MiB
    assert _rss_anon() - before < slot
    filled = _rss_anon()
    cache.k[0][5].fill_(1.0)
    assert slot <= _rss_anon() - filled < 2 * slot
    assert not cache.k[3].any() and not cache.v[0].any() and not cache.k[0][4].any() and cache.k[0].is_contiguous()
    assert cache.k[0][5].sum().item() == slot // 2
    written = _rss_anon()
    del cache
    assert written - _rss_anon() >= slot
