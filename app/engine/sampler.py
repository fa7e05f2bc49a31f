"""Batched token sampling on fp32 logits for a continuous-batching engine.

One ``sample(logits, states)`` call per decode step; row ``i`` of ``logits`` belongs to
``states[i]``, each with its own ``SamplingParams``.  Pipeline, per row:

1. ``logit_bias`` (OpenAI): each listed token's bias is added to its logit (-100 all but bans it)
   then penalties (only rows that use them; in place on a private copy of the logits)
   - repetition (HF/CTRL style) over prompt + output tokens: ``l > 0 -> l / r``, else ``l * r``
   - presence / frequency (OpenAI) over output tokens: ``l -= presence * (count > 0) + frequency * count``
2. ``min_tokens``: while fewer than ``min_tokens`` tokens were generated, EOS ids and
   ``stop_token_ids`` are set to -inf (``ignore_eos`` is a stopping rule, handled by the engine).
   A row with a grammar (``response_format``, app/engine/grammar.py) instead gets every token the grammar
   does not allow next set to -inf; the grammar decides where the text may end, so min_tokens does not
   apply to it.
3. greedy rows (temperature ~0 or top_k == 1) take the argmax.
4. the other rows, vectorized across rows with per-row parameter tensors:
   temperature -> top_k -> top_p -> min_p (filtered logits become -inf; the most likely token is
   always kept, so a row can never be filtered empty) -> one draw per row.

The draw is inverse-CDF sampling with ONE uniform number per row, taken from the row's own
``states[i].generator``: unnormalized weights ``exp(l - max)`` are cumulated and the first
position whose cumulative weight exceeds ``u * total`` wins.  A request's random stream therefore
does not depend on the vocabulary size, its filters or the other rows, so a seeded request
produces the same tokens whatever else is in the batch, and in whatever order (up to float
rounding of vectorized kernels, which could only matter for a draw landing within ~1e-7 of a
token boundary).  -inf logits get weight exactly 0 and are never drawn; no NaN can appear (an
all -inf row, which the filters themselves never produce, yields an arbitrary valid id).
(This is cheaper than the exponential race / Gumbel-max trick, which needs V random numbers
per row: drawing 128k exponentials costs ~3 ms on CPU.)

Filtering strategy: rows with top_k/top_p work on a sorted candidate window (``torch.topk`` of
the largest top_k, at least ``_TOP_P_WINDOW`` tokens for top_p-only rows; a top_p row whose
nucleus does not fit in the window is redone with a 16x larger one, up to a full sort), since a
full sort of a 128k row costs ~11 ms on CPU against ~0.8 ms for a top-1024 and ~2 ms for a
top-16384 selection.  Rows without them stay in vocabulary order.

Fast path: when every row is greedy with no penalty and no active ``min_tokens``, the whole step
is a single ``argmax`` over the batch.

The caller's ``logits`` tensor is never modified.  ``sample`` does not record the chosen token:
the engine calls ``SamplingState.append(token_id)`` afterwards (it only advances each sampled
row's generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from app.engine.sampling_state import MIN_LOGPROB, SamplingStateBase  # noqa: F401 - MIN_LOGPROB re-exported
from app.engine.types import Logprob, SamplingParams

# exp() arguments below this are treated as weight 0 (exp(-78) ~ 1e-34, still a normal float32).
_MIN_LOG_WEIGHT = -78.0
# top_p without top_k: only this many best tokens are sorted, unless their mass is below top_p.
_TOP_P_WINDOW = 1024
_WINDOW_GROWTH = 16


class SamplingState(SamplingStateBase):
    """Per-sequence sampling state (app/engine/sampling_state.py) with torch tensors and a torch.Generator.
    Token-count tensors exist only when a penalty needs them."""

    __slots__ = ()

    @staticmethod
    def _generator(seed: int) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        return generator

    @staticmethod
    def _ids(ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long)

    @staticmethod
    def _values(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32)

    def _ensure_penalty_arrays(self) -> None:
        if self._repetition_penalty != 1.0 and self._seen is None:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            ids = self._prompt_seen_ids()
            if ids:
                seen[torch.tensor(ids, dtype=torch.long)] = True
            self._seen = seen
        if (self._presence_penalty != 0.0 or self._frequency_penalty != 0.0) and self._counts is None:
            self._counts = torch.zeros(self.vocab_size, dtype=torch.float32)

    def _apply(self, row: torch.Tensor) -> None:
        """Logit bias, penalties, min_tokens and grammar masks, in place.  row: [V] fp32 (a private copy's)."""
        if self._bias is not None:
            row.index_add_(0, self._bias_ids, self._bias)
        if self.has_penalties:
            self._ensure_penalty_arrays()
            if self._seen is not None:
                r = self._repetition_penalty
                penalized = torch.where(row > 0, row / r, row * r)
                row.copy_(torch.where(self._seen, penalized, row))
            if self._counts is not None:
                counts = self._counts
                if self._frequency_penalty != 0.0:
                    row.sub_(counts * self._frequency_penalty)
                if self._presence_penalty != 0.0:
                    row.sub_((counts > 0).to(row.dtype) * self._presence_penalty)
        if self.num_output_tokens < self._min_tokens:
            row[self._min_tokens_ids] = -math.inf
        if self.constraint is not None:
            self.constraint.mask_(row)


def sample(logits: torch.Tensor, states: Sequence[SamplingState]) -> list[int]:
    """Pick one token per row.  logits: [B, V] fp32, B == len(states).  Returns B token ids.

    Does not modify ``logits`` and does not call ``append`` on the states.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match {len(states)} states")
    batch = len(states)
    if batch == 0:
        return []

    processed = [i for i, s in enumerate(states) if s.needs_processing]
    if not processed and all(s.greedy for s in states):
        return logits.argmax(dim=-1).tolist()  # fast path

    x = logits
    if processed:
        x = logits.clone()  # private copy: penalties are applied in place
        for i in processed:
            states[i]._apply(x[i])

    out = [0] * batch
    sampled = [i for i, s in enumerate(states) if not s.greedy]
    if len(sampled) < batch:
        greedy_rows = [i for i, s in enumerate(states) if s.greedy]
        greedy_x = x[greedy_rows] if len(greedy_rows) < batch else x
        picks = greedy_x.argmax(dim=-1).tolist()
        for i, t in zip(greedy_rows, picks):
            out[i] = t
    if sampled:
        rows = x[sampled]  # [R, V] advanced indexing -> a copy we may modify
        picks = _sample_rows(rows, [states[i] for i in sampled])
        for i, t in zip(sampled, picks):
            out[i] = t
    return out


def _sample_rows(x: torch.Tensor, states: Sequence[SamplingState]) -> list[int]:
    """Temperature, filters and one draw per row.  x: [R, V] fp32, a private copy.  Returns R ids."""
    vocab = x.shape[1]
    temps = [s.params.temperature for s in states]
    if any(t != 1.0 for t in temps):
        x.div_(torch.tensor(temps, dtype=x.dtype).unsqueeze(1))  # [R, 1]

    # One uniform per row from the row's own generator: the RNG stream of a request does not
    # depend on the vocabulary size, on its filters or on the other rows.
    uniforms = [torch.rand((), generator=s.generator).item() for s in states]

    out = [0] * len(states)
    candidate_rows = [j for j, s in enumerate(states) if _has_rank_filter(s.params, vocab)]
    full_rows = [j for j, s in enumerate(states) if not _has_rank_filter(s.params, vocab)]
    if candidate_rows:
        sub = [states[j].params for j in candidate_rows]
        xs = x[candidate_rows] if len(candidate_rows) < len(states) else x
        vals, idx = _candidates(xs, sub)  # [F, K] each
        pos = _inverse_cdf(vals, [uniforms[j] for j in candidate_rows])  # [F]
        for j, t in zip(candidate_rows, idx.gather(1, pos.unsqueeze(1)).squeeze(1).tolist()):
            out[j] = t
    if full_rows:
        xs = x[full_rows] if len(full_rows) < len(states) else x  # [U, V]
        _apply_min_p(xs, [states[j].params.min_p for j in full_rows], xs.max(dim=-1, keepdim=True).values)
        pos = _inverse_cdf(xs, [uniforms[j] for j in full_rows])
        for j, t in zip(full_rows, pos.tolist()):
            out[j] = t
    return out


def _has_rank_filter(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def _apply_min_p(x: torch.Tensor, min_ps: list[float], row_max: torch.Tensor) -> None:
    """In place.  x: [R, N], row_max: [R, 1].  p_i < min_p * p_max  <=>  l_i < l_max + log(min_p)."""
    if any(m > 0.0 for m in min_ps):
        log_min_p = torch.tensor([math.log(m) if m > 0.0 else -math.inf for m in min_ps], dtype=x.dtype)
        x.masked_fill_(x < row_max + log_min_p.unsqueeze(1), -math.inf)


def _candidates(
    x: torch.Tensor, params: list[SamplingParams], min_window: int = _TOP_P_WINDOW
) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k -> top_p -> min_p for rows that have top_k and/or top_p.

    x: [F, V] temperature-scaled logits.  Returns (vals, idx), both [F, K], sorted by descending
    logit, filtered entries set to -inf (they always form a suffix of each row).  Only a window of
    the K best tokens is selected (``torch.topk``; K = the largest top_k, at least ``min_window``
    when a row has top_p without top_k).  Rows whose nucleus does not fit in the window are redone
    with a window _WINDOW_GROWTH times larger, up to a full sort.
    """
    num_rows, vocab = x.shape
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]  # vocab = no top_k
    ps = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]  # 2.0 = no top_p (never reached)
    # Rows with top_p but no top_k need the full softmax normalizer; top_k rows normalize over k.
    needs_full_norm = [p < 1.0 and k >= vocab for k, p in zip(ks, ps)]

    window = max((k for k in ks if k < vocab), default=0)
    if any(needs_full_norm):
        window = max(window, min_window)
    window = min(window, vocab)
    if window < vocab:
        vals, idx = torch.topk(x, window, dim=-1, sorted=True)
    else:
        vals, idx = torch.sort(x, dim=-1, descending=True)

    if any(k < window for k in ks):
        k_t = torch.tensor(ks).unsqueeze(1)  # [F, 1]
        vals.masked_fill_(torch.arange(window).unsqueeze(0) >= k_t, -math.inf)

    row_max = vals[:, :1].clone()  # [F, 1]; position 0 always survives the filters
    short: list[int] = []
    if any(p < 1.0 for p in ps):
        finite_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        # log of the normalizer: over the full row for top_p-only rows, over the kept top-k else.
        log_z = torch.log(_exp_weights(vals - finite_max).sum(dim=-1, keepdim=True))  # [F, 1]
        if any(needs_full_norm) and window < vocab:
            full_log_z = torch.log(_exp_weights(x - finite_max).sum(dim=-1, keepdim=True))
            log_z = torch.where(torch.tensor(needs_full_norm).unsqueeze(1), full_log_z, log_z)
        probs = _exp_weights(vals - finite_max - log_z)  # [F, K]
        cum = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # fp64: no drift over long rows
        drop = (cum - probs) >= torch.tensor(ps, dtype=torch.float64).unsqueeze(1)
        drop[:, 0] = False  # the most likely token always survives
        vals.masked_fill_(drop, -math.inf)
        if window < vocab:
            # The nucleus of a top_p-only row may extend beyond the window (top_k rows are
            # complete: the window holds all their k candidates).
            last = cum[:, -1].tolist()
            short = [j for j in range(num_rows) if needs_full_norm[j] and last[j] < ps[j]]
    _apply_min_p(vals, [p.min_p for p in params], row_max)
    if not short:
        return vals, idx

    redo_vals, redo_idx = _candidates(x[short], [params[j] for j in short], window * _WINDOW_GROWTH)
    width = redo_vals.shape[1]  # > window
    out_vals = torch.full((num_rows, width), -math.inf, dtype=vals.dtype)
    out_idx = torch.zeros((num_rows, width), dtype=torch.long)
    out_vals[:, :window] = vals
    out_idx[:, :window] = idx
    out_vals[short] = redo_vals
    out_idx[short] = redo_idx
    return out_vals, out_idx


def _exp_weights(d: torch.Tensor) -> torch.Tensor:
    """exp(d) for d <= 0, with results below exp(_MIN_LOG_WEIGHT) flushed to exactly 0.

    Underflowing into subnormal floats is very slow on x86 CPUs (microcode assists, ~10x for a
    typical logits row); those weights are < 1e-34 of the best token's and cannot matter.
    """
    small = d < _MIN_LOG_WEIGHT
    return d.clamp(min=_MIN_LOG_WEIGHT).exp_().masked_fill_(small, 0.0)


def _inverse_cdf(x: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """Draw one position per row from softmax(x).  x: [R, N] (-inf = excluded); returns [R] long.

    Unnormalized weights exp(x - max) are cumulated (in fp64) and the first position whose cumulative
    weight exceeds u * total is taken, so zero-weight positions are never picked.  A row that is
    entirely -inf (cannot happen after our filters unless the model produced it) yields position
    N - 1 instead of NaN.
    """
    row_max = x.max(dim=-1, keepdim=True).values  # [R, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # fp64 accumulation: in fp32, tail tokens with weight ~ulp(total) would be rounded to 0 or
    # to a whole ulp, biasing the tail of a 100k+ vocabulary noticeably.
    cdf = torch.cumsum(_exp_weights(x - row_max), dim=-1, dtype=torch.float64)  # [R, N]
    total = cdf[:, -1:]  # [R, 1]
    target = torch.tensor(uniforms, dtype=torch.float64).unsqueeze(1) * total
    # u < 1, but u * total may round up to total: keep the target strictly below it.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    pos = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [R]
    return pos.clamp_(max=x.shape[1] - 1)




def logprobs_of(logits: torch.Tensor, targets: Sequence[int], num_top: Sequence[int]) -> list[Logprob]:
    """Log-probabilities of `targets[i]` under softmax(logits[i]), with the num_top[i] best alternatives.

    logits: [R, V] raw model logits (fp32); R == len(targets) == len(num_top). Computed from the raw
    logits, before penalties, temperature and filters, as vLLM and OpenAI report them."""
    if logits.dim() != 2 or logits.shape[0] != len(targets) or len(targets) != len(num_top):
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match {len(targets)} targets")
    if not targets:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(targets, dtype=torch.long).unsqueeze(1)).squeeze(1)
    chosen = chosen.clamp(min=MIN_LOGPROB).tolist()
    k = min(max(num_top), lp.shape[1])
    top_vals, top_ids = (torch.topk(lp, k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long()))
    top_vals, top_ids = top_vals.clamp(min=MIN_LOGPROB).tolist(), top_ids.tolist()
    return [Logprob(int(t), c, tuple(zip(ids[:n], vals[:n])))
            for t, c, ids, vals, n in zip(targets, chosen, top_ids, top_vals, num_top)]
