"""KV storage for many sequences: one preallocated slot per running sequence, and attention over it.

Layout and algorithm
--------------------
Each layer owns two tensors `k`, `v` of shape [num_slots, n_kv_heads, max_len, head_dim], allocated
(zeroed) once at start-up and never grown.  They are fp32, or bf16 (`kv_cache_dtype`, bf16 by default for
quantized models): half the bytes, so twice the slots in a budget and half the bytes a decode step's
attention reads.  Keys and values are computed in fp32, rounded to bf16 when stored, and widened back to
fp32 when read (the C++ attention widens as it loads; the ATen paths and the prompt chunks' SDPA take an
fp32 copy of what they read), so all arithmetic stays fp32. A sequence gets one slot for its whole life
(`allocate` on its first step, `free` when it finishes); freed slots are reused lowest-first, which keeps
the running sequences packed at the low slot ids. The number of slots comes from a byte budget, capped by
the scheduler's `max_num_seqs`.

A step feeds a flat varlen batch of T tokens (all inputs concatenated, single-token inputs first, sorted
by slot). `BatchMeta` holds every index tensor of that step, built once and shared by all layers.
Per layer, `KVCache.store` and `KVCache.attend`:

1. `store` applies RoPE and writes the new K/V of all T tokens at (slot, :, position): one C++ call
   (app/models/ops.py `rope_store`), or rope ops and one `index_put_` per tensor without the kernels;
2. decode rows (inputs of one token) run as one C++ call (app/models/ops.py `decode_attention`: each row
   over its own slot and length, no masks), or without the kernels as ONE `scaled_dot_product_attention`
   whose layout `plan` builds: their slots are read
   as a zero-copy view `k[lo:lo+R, :, :L]` of the slot range they span (packed slots: R == rows), with
   a length mask; grouped-query attention is done by viewing q as [R, n_kv, q_per_kv, head_dim], i.e.
   the query heads sharing a KV head become that head's "query length" (measured faster here than
   `enable_gqa` and than a per-sequence loop). When the slots are too scattered (R > 2 * rows) the
   slots are gathered with `index_select` instead;
3. prefill chunks (inputs of several tokens) run one SDPA each over their own slot view
   `k[slot, :, :start + n]`, with `is_causal` when the chunk starts at 0 and an explicit causal mask
   offset by `start_pos` otherwise.

The cache is zero-filled so that masked-out positions never hold NaN/inf (0 * NaN would leak through
the softmax @ V product); stale values of a previous occupant are finite and always masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from app import heap
from app.models import ops
from app.models.slots import SlotPool

# Use the packed-range view for decode rows while the slot range is at most this many times the rows.
DECODE_RANGE_SLACK = 2


@dataclass
class PrefillSpan:
    """One multi-token input of the step."""

    offset: int  # first row of this input in the flat batch
    length: int  # tokens fed now
    slot: int
    kv_len: int  # start_pos + length: keys this chunk attends to
    mask: torch.Tensor | None  # [length, kv_len] bool (True = attend); None = causal from position 0


@dataclass
class BatchMeta:
    """Per-step index tensors, built once per step and read by every layer."""

    slot_ids: torch.Tensor  # [T] long: slot of each fed token
    positions: torch.Tensor  # [T] long: absolute position of each fed token
    cos: torch.Tensor  # [T, 1, head_dim] rope cos at `positions`
    sin: torch.Tensor  # [T, 1, head_dim] rope sin at `positions`, first half negated (see ops.apply_rope)
    logit_rows: torch.Tensor  # [R] long: flat rows whose logits are returned (each input's last token, or all)
    num_decode: int  # the first num_decode rows are single-token inputs, sorted by slot
    # the masked-SDPA decode path only (ATen ops; left empty when Lanner's C++ decode attention runs):
    decode_lo: int  # range mode: the decode rows read slots [decode_lo, decode_lo + decode_range)
    decode_range: int
    decode_kv_len: int  # keys read by the decode attention (max length among decode rows)
    decode_mask: torch.Tensor | None  # [R, 1, 1, decode_kv_len] bool, R = decode_range or num_decode
    decode_scatter: torch.Tensor | None  # [num_decode] rows of the range used (None: identity)
    decode_gather: torch.Tensor | None  # [num_decode] slots to gather (gather mode), else None
    prefills: list[PrefillSpan]


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """app/heap.py's `lazy_zeros` as a torch tensor: zeros resident only where written."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(heap.lazy_zeros((nbytes,), np.uint8)).view(dtype).view(shape)


class KVCache(SlotPool):
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        num_slots: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [lazy_zeros(shape, dtype) for _ in range(num_layers)]
        self.v = [lazy_zeros(shape, dtype) for _ in range(num_layers)]
        super().__init__(num_slots)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len

    # ------------------------------------------------------------ sizing

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                       dtype: torch.dtype = torch.float32) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * max_len * head_dim * elem

    @classmethod
    def slots_for_budget(cls, budget_bytes: int | None, max_slots: int, num_layers: int, num_kv_heads: int,
                         head_dim: int, max_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Slots that fit in `budget_bytes` (all of `max_slots` when None), capped by `max_slots`."""
        per_slot = cls.bytes_per_slot(num_layers, num_kv_heads, head_dim, max_len, dtype)
        return cls.slots_in_budget(budget_bytes, max_slots, per_slot, max_len)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    # ------------------------------------------------------------ slots

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Positions [0, n) of every layer's keys and values from slot `src` to slot `dst`."""
        for cache in (*self.k, *self.v):
            cache[dst, :, :n].copy_(cache[src, :, :n])

    # ------------------------------------------------------------ per step

    def plan(self, rows: list[tuple[int, int, int]], cos: torch.Tensor, sin: torch.Tensor,
             logit_rows: torch.Tensor, positions: torch.Tensor, slot_ids: torch.Tensor) -> BatchMeta:
        """Attention metadata for a flat batch.

        rows: (slot, start_pos, num_tokens) per input in flat order, single-token inputs first and sorted
        by slot. The other tensors are passed through (see BatchMeta).
        """
        num_decode = 0
        while num_decode < len(rows) and rows[num_decode][2] == 1:
            num_decode += 1
        decode = rows[:num_decode]
        lo = rng = kv_len = 0
        mask = scatter = gather = None
        if decode and not ops.own_ops():  # the masked SDPA's layout; the C++ attention reads slots/positions
            slots = [r[0] for r in decode]
            lengths = [r[1] + 1 for r in decode]
            kv_len = max(lengths)
            lo, rng = slots[0], slots[-1] - slots[0] + 1
            lens = torch.tensor(lengths)
            if rng <= DECODE_RANGE_SLACK * num_decode:
                if rng != num_decode:
                    scatter = torch.tensor(slots) - lo
                    full = torch.ones(rng, dtype=torch.long)  # idle rows attend to position 0 only
                    lens = full.index_copy_(0, scatter, lens)
            else:
                gather = torch.tensor(slots)
                rng = 0
            mask = (torch.arange(kv_len) < lens[:, None]).view(-1, 1, 1, kv_len)
        prefills = []
        offset = num_decode
        for slot, start, n in rows[num_decode:]:
            pmask = None
            if start > 0:
                pmask = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]
            prefills.append(PrefillSpan(offset, n, slot, start + n, pmask))
            offset += n
        return BatchMeta(slot_ids=slot_ids, positions=positions, cos=cos, sin=sin, logit_rows=logit_rows,
                         num_decode=num_decode, decode_lo=lo, decode_range=rng, decode_kv_len=kv_len,
                         decode_mask=mask, decode_scatter=scatter, decode_gather=gather, prefills=prefills)

    def store(self, layer: int, qkv: torch.Tensor, meta: BatchMeta, num_heads: int) -> torch.Tensor:
        """RoPE on the queries and keys of a fused QKV output, keys and values written to this layer's cache.

        qkv: [T, (n_heads + 2 n_kv_heads) head_dim], rows [q | k | v] -> rotated queries [T, n_heads, head_dim]
        """
        return ops.rope_store(qkv, self.k[layer], self.v[layer], meta.cos, meta.sin, meta.slot_ids,
                              meta.positions, num_heads, self.num_kv_heads)

    def attend(self, layer: int, q: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Attend every query over its own sequence (its keys and values are already `store`d).

        q: [T, n_heads, head_dim] (rope applied) -> [T, n_heads * head_dim]
        """
        kc, vc = self.k[layer], self.v[layer]
        t, n_heads, hd = q.shape
        group = n_heads // self.num_kv_heads
        outs = []
        nd = meta.num_decode
        if nd and ops.own_ops():  # Lanner's C++ decode attention: each row over its own slot and length
            outs.append(ops.decode_attention(q[:nd], kc, vc, meta.slot_ids[:nd], meta.positions[:nd]))
        elif nd:
            # the query heads sharing a KV head become that head's "query length"
            qd = q[:nd].view(nd, self.num_kv_heads, group, hd)
            L = meta.decode_kv_len
            if meta.decode_gather is not None:
                kd = kc[:, :, :L].index_select(0, meta.decode_gather)
                vd = vc[:, :, :L].index_select(0, meta.decode_gather)
            else:
                lo, rng = meta.decode_lo, meta.decode_range
                kd, vd = kc[lo:lo + rng, :, :L], vc[lo:lo + rng, :, :L]
                if meta.decode_scatter is not None:
                    packed = qd.new_zeros(rng, self.num_kv_heads, group, hd)
                    qd = packed.index_copy_(0, meta.decode_scatter, qd)
            od = F.scaled_dot_product_attention(qd, kd.float(), vd.float(), attn_mask=meta.decode_mask)
            if meta.decode_scatter is not None:
                od = od.index_select(0, meta.decode_scatter)
            outs.append(od.reshape(nd, n_heads * hd))
        for span in meta.prefills:
            qp = q[span.offset:span.offset + span.length].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            kp = kc[span.slot, :, :span.kv_len].unsqueeze(0).float()  # [1, n_kv, kv_len, hd], fp32
            vp = vc[span.slot, :, :span.kv_len].unsqueeze(0).float()
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, is_causal=span.mask is None,
                                                enable_gqa=group > 1)
            outs.append(op[0].transpose(0, 1).reshape(span.length, n_heads * hd))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
