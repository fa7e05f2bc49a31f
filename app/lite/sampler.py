"""Token sampling on numpy fp32 logits: app/engine/sampler.py without torch.

Same public API and the same pipeline as the torch sampler (read its module docstring), for a worker
that does not import torch:

1. ``logit_bias``, then penalties (repetition HF-style over prompt + output, presence / frequency over
   the output), then ``min_tokens`` (EOS and ``stop_token_ids`` at -inf; not for grammar rows), then
   the grammar mask (``Constraint.mask_`` accepts a numpy row).
2. greedy rows (temperature ~0 or ``params.is_greedy``) take the argmax (the first maximal index).
3. the other rows: temperature -> top_k -> top_p -> min_p (the most likely token always survives),
   then ONE uniform number from the row's own generator (``numpy.random.Generator(PCG64(seed))``)
   and an inverse-CDF draw over the unnormalized weights ``exp(l - max)``.

All-greedy batches without any processing take a single ``argmax`` (fast path).

Differences from the torch sampler, by design:

- the random stream is numpy's PCG64 (a float64 uniform), not torch's, so a seed gives other tokens
  than in the torch worker (but always the same ones within this sampler);
- rows are filtered and drawn one at a time: a row's computation depends only on its own logits and
  parameters, so a seeded request gets bit-identical results whatever else is in the batch, in any
  row order (the torch sampler shares a candidate window between rows);
- equal logits are ranked by increasing token id (a stable descending sort), both for the top_k /
  top_p cut-offs and for the ``logprobs_of`` top lists, where ``torch.topk`` / ``torch.sort`` leave the
  order of ties unspecified.

The caller's ``logits`` array is never modified.  ``sample`` does not record the chosen token: the
engine calls ``SamplingState.append(token_id)`` afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from app.engine.sampling_state import MIN_LOGPROB, SamplingStateBase
from app.engine.types import Logprob, SamplingParams

# exp() arguments below this are treated as weight 0 (exp(-78) ~ 1e-34, still a normal float32).
_MIN_LOG_WEIGHT = np.float32(-78.0)
# top_p without top_k: only this many best tokens are sorted, unless their mass is below top_p.
_TOP_P_WINDOW = 1024
_WINDOW_GROWTH = 16
_NEG_INF = np.float32(-np.inf)



class SamplingState(SamplingStateBase):
    """Per-sequence sampling state (app/engine/sampling_state.py) with numpy arrays and a PCG64 generator.
    Token-count arrays exist only when a penalty needs them."""

    __slots__ = ()

    @staticmethod
    def _generator(seed: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(seed))

    @staticmethod
    def _ids(ids: list[int]) -> np.ndarray:
        return np.array(ids, dtype=np.int64)

    @staticmethod
    def _values(values: list[float]) -> np.ndarray:
        return np.array(values, dtype=np.float32)

    def _ensure_penalty_arrays(self) -> None:
        if self._repetition_penalty != 1.0 and self._seen is None:
            seen = np.zeros(self.vocab_size, dtype=np.bool_)
            ids = self._prompt_seen_ids()
            if ids:
                seen[np.array(ids, dtype=np.int64)] = True
            self._seen = seen
        if (self._presence_penalty != 0.0 or self._frequency_penalty != 0.0) and self._counts is None:
            self._counts = np.zeros(self.vocab_size, dtype=np.float32)

    def _apply(self, row: np.ndarray) -> None:
        """Logit bias, penalties, min_tokens and grammar masks, in place.  row: [V] fp32 (a private copy)."""
        if self._bias is not None:
            np.add.at(row, self._bias_ids, self._bias)  # repeated ids add up, like index_add_
        if self.has_penalties:
            self._ensure_penalty_arrays()
            if self._seen is not None:
                r = np.float32(self._repetition_penalty)
                seen = row[self._seen]
                row[self._seen] = np.where(seen > 0, seen / r, seen * r)
            if self._counts is not None:
                counts = self._counts
                if self._frequency_penalty != 0.0:
                    row -= counts * np.float32(self._frequency_penalty)
                if self._presence_penalty != 0.0:
                    row -= (counts > 0).astype(np.float32) * np.float32(self._presence_penalty)
        if self.num_output_tokens < self._min_tokens:
            row[self._min_tokens_ids] = _NEG_INF
        if self.constraint is not None:
            self.constraint.mask_(row)


def sample(logits: np.ndarray, states: Sequence[SamplingState]) -> list[int]:
    """Pick one token per row.  logits: [B, V] fp32, B == len(states).  Returns B token ids.

    Does not modify ``logits`` and does not call ``append`` on the states.
    """
    x = np.asarray(logits)
    if x.ndim != 2 or x.shape[0] != len(states):
        raise ValueError(f"logits shape {tuple(x.shape)} does not match {len(states)} states")
    if not states:
        return []
    if x.dtype != np.float32:
        x = x.astype(np.float32)

    processed = [s.needs_processing for s in states]
    if not any(processed) and all(s.greedy for s in states):
        return x.argmax(axis=-1).tolist()  # fast path

    out: list[int] = []
    # -inf - -inf and the like only occur on rows with no finite logit; their result is arbitrary anyway.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for row, state, process in zip(x, states, processed):
            if process or not state.greedy:
                row = row.copy()  # private: processing, temperature and filters work in place
            if process:
                state._apply(row)
            out.append(int(row.argmax()) if state.greedy else _sample_row(row, state))
    return out


def _sample_row(x: np.ndarray, state: SamplingState) -> int:
    """Temperature, filters and one draw.  x: [V] fp32, a private copy.  Returns a token id."""
    p = state.params
    if p.temperature != 1.0:
        x /= np.float32(p.temperature)
    # One uniform per sampled row and step: the stream does not depend on the vocabulary or the filters.
    u = float(state.generator.random())
    if _has_rank_filter(p, x.shape[0]):
        vals, idx = _candidates(x, p)
        return int(idx[_inverse_cdf(vals, u)])
    _apply_min_p(x, p.min_p, x.max())
    return _inverse_cdf(x, u)


def _has_rank_filter(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def _apply_min_p(x: np.ndarray, min_p: float, row_max: np.floating) -> None:
    """In place.  p_i < min_p * p_max  <=>  l_i < l_max + log(min_p)."""
    if min_p > 0.0:
        x[x < row_max + np.float32(math.log(min_p))] = _NEG_INF


def _top_indices(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest entries of the 1-D ``x``, best first, equal values by increasing index:
    the first n of a stable descending sort, found with a partition when n < len(x)."""
    size = x.shape[0]
    neg = -x  # ascending order of -x == descending order of x (negation is exact)
    if n >= size:
        return np.argsort(neg, kind="stable")
    if n <= 0:
        return np.zeros(0, dtype=np.intp)
    threshold = np.partition(neg, n - 1)[n - 1]  # the n-th best value
    if np.isnan(threshold):  # NaN logits (a broken model): no partition order, sort everything
        return np.argsort(neg, kind="stable")[:n]
    better = np.flatnonzero(neg < threshold)
    ties = np.flatnonzero(neg == threshold)[: n - better.size]  # the lowest ids among the n-th value's
    # Both parts are in id order, and equal values never span them, so a stable sort breaks ties by id.
    candidates = np.concatenate((better, ties))
    return candidates[np.argsort(neg[candidates], kind="stable")]


def _candidates(
    x: np.ndarray, p: SamplingParams, min_window: int = _TOP_P_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """top_k -> top_p -> min_p for a row that has top_k and/or top_p.

    x: [V] temperature-scaled logits.  Returns (vals, idx), both [K], sorted by descending logit
    (equal logits by increasing id), filtered entries set to -inf (they form a suffix).  Only a window
    of the K best tokens is selected: K = top_k, or ``min_window`` for top_p without top_k, in which case
    a nucleus that does not fit in the window is redone with a window _WINDOW_GROWTH times larger, up to
    the whole row.
    """
    vocab = x.shape[0]
    k = p.top_k if 0 < p.top_k < vocab else vocab  # vocab = no top_k
    top_p = p.top_p if p.top_p < 1.0 else None
    # top_p without top_k needs the normalizer of the full row; with top_k it is over the k kept.
    needs_full_norm = top_p is not None and k >= vocab
    window = min(max(k if k < vocab else 0, min_window if needs_full_norm else 0), vocab)

    idx = _top_indices(x, window)
    vals = x[idx]  # [K] a copy; a top_k row's window is exactly its k best
    row_max = vals[0]  # position 0 always survives the filters
    if top_p is not None:
        finite_max = row_max if np.isfinite(row_max) else np.float32(0.0)
        if needs_full_norm and window < vocab:
            total = _exp_weights(x - finite_max).sum()
        else:
            total = _exp_weights(vals - finite_max).sum()
        log_z = np.log(total)
        probs = _exp_weights(vals - finite_max - log_z)  # [K] fp32
        cum = np.cumsum(probs, dtype=np.float64)  # fp64: no drift over long rows
        drop = (cum - probs) >= top_p
        drop[0] = False  # the most likely token always survives
        vals[drop] = _NEG_INF
        # The nucleus of a top_p-only row may extend beyond the window.
        if needs_full_norm and window < vocab and cum[-1] < top_p:
            return _candidates(x, p, window * _WINDOW_GROWTH)
    _apply_min_p(vals, p.min_p, row_max)
    return vals, idx


def _exp_weights(d: np.ndarray) -> np.ndarray:
    """exp(d) for d <= 0 (fp32), with results below exp(_MIN_LOG_WEIGHT) flushed to exactly 0.

    Underflowing into subnormal floats is very slow on x86 CPUs (microcode assists); those weights are
    < 1e-34 of the best token's and cannot matter.
    """
    small = d < _MIN_LOG_WEIGHT
    w = np.exp(np.maximum(d, _MIN_LOG_WEIGHT))
    w[small] = 0.0
    return w


def _inverse_cdf(x: np.ndarray, u: float) -> int:
    """Draw one position from softmax(x).  x: [N] (-inf = excluded), u in [0, 1).

    Unnormalized weights exp(x - max) are cumulated (in fp64) and the first position whose cumulative
    weight exceeds u * total is taken, so zero-weight positions are never picked.  A row that is
    entirely -inf (cannot happen after our filters unless the model produced it) yields position N - 1.
    """
    row_max = x.max()
    if not np.isfinite(row_max):
        row_max = np.float32(0.0)
    # fp64 accumulation: in fp32, tail tokens with weight ~ulp(total) would be rounded to 0 or to a
    # whole ulp, biasing the tail of a 100k+ vocabulary noticeably.
    cdf = np.cumsum(_exp_weights(x - row_max), dtype=np.float64)
    total = cdf[-1]
    # u < 1, but u * total may round up to total: keep the target strictly below it.
    target = min(u * total, np.nextafter(total, 0.0))
    pos = int(np.searchsorted(cdf, target, side="right"))
    return min(pos, x.shape[0] - 1)


def logprobs_of(logits: np.ndarray, targets: Sequence[int], num_top: Sequence[int]) -> list[Logprob]:
    """Log-probabilities of `targets[i]` under softmax(logits[i]), with the num_top[i] best alternatives.

    logits: [R, V] raw model logits (fp32); R == len(targets) == len(num_top). Computed from the raw
    logits, before penalties, temperature and filters, as vLLM and OpenAI report them.  Values below
    MIN_LOGPROB (-inf) are reported as MIN_LOGPROB; the top lists are best first, equal values by id."""
    x = np.asarray(logits)
    if x.ndim != 2 or x.shape[0] != len(targets) or len(targets) != len(num_top):
        raise ValueError(f"logits shape {tuple(x.shape)} does not match {len(targets)} targets")
    if not targets:
        return []
    vocab = x.shape[1]
    ids = np.array(targets, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= vocab:
        raise IndexError(f"target ids must be in [0, {vocab})")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lp = _log_softmax(x.astype(np.float32, copy=False))
        chosen = np.maximum(lp[np.arange(len(ids)), ids], np.float32(MIN_LOGPROB)).tolist()
        k = min(max(num_top), vocab)
        out = []
        for row, t, c, n in zip(lp, targets, chosen, num_top):
            top: tuple[tuple[int, float], ...] = ()
            n = min(n, k)
            if n > 0:
                top_ids = _top_indices(row, n)
                top_vals = np.maximum(row[top_ids], np.float32(MIN_LOGPROB))
                top = tuple(zip(top_ids.tolist(), top_vals.tolist()))
            out.append(Logprob(int(t), c, top))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in fp32, computed as torch's CPU kernel does: (x - max) - log(sum)."""
    shifted = x - x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return shifted - log_z
