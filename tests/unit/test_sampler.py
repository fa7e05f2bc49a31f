"""Tests for the two samplers, app/engine/sampler.py (torch tensors) and app/lite/sampler.py (numpy arrays),
on the behaviour they share (all seeded and deterministic).

Every test taking the ``sampler`` fixture runs once per implementation (ids ``torch`` and ``numpy``) on the
same logits, made with numpy and handed to each sampler as its own array type.  What only the numpy sampler
promises (its PCG64 stream, ties by lowest id, rows computed one at a time) and its comparisons with the
torch sampler are in tests/unit/test_lite_sampler.py."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

import app.engine.sampler as torch_sampler
import app.lite.sampler as lite_sampler
from app.engine.sampling_state import MIN_LOGPROB
from app.engine.types import SamplingParams

EOS = 2


def _torch_candidates(x: np.ndarray, params: list[SamplingParams]) -> list[tuple[np.ndarray, np.ndarray]]:
    """All rows in one call: the torch sampler shares a candidate window between the rows."""
    vals, idx = torch_sampler._candidates(torch.from_numpy(x.copy()), params)
    return list(zip(vals.numpy(), idx.numpy()))


def _numpy_candidates(x: np.ndarray, params: list[SamplingParams]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [lite_sampler._candidates(row.copy(), p) for row, p in zip(x, params)]


@dataclass(frozen=True)
class Sampler:
    """One implementation: its module, how a list / numpy array becomes its logits ([B, V] fp32), and its
    top_k -> top_p -> min_p filters (``_candidates``) on [F, V] temperature-scaled rows, as (vals, idx) a row."""

    name: str
    module: ModuleType
    array: Callable[[Any], Any]
    candidates: Callable[[np.ndarray, list[SamplingParams]], list[tuple[np.ndarray, np.ndarray]]]

    def state(self, vocab: int = 50, prompt: tuple[int, ...] = (), eos: tuple[int, ...] = (EOS,), **kw: object
              ) -> Any:
        return self.module.SamplingState(SamplingParams(**kw), list(prompt), vocab, list(eos))

    def sample(self, logits: Any, states: list[Any]) -> list[int]:
        return self.module.sample(logits, states)


TORCH = Sampler("torch", torch_sampler, lambda x: torch.from_numpy(np.array(x, dtype=np.float32)),
                _torch_candidates)
# np.asarray: an fp32 array is handed over as it is (a read-only view stays read-only), so any write shows.
NUMPY = Sampler("numpy", lite_sampler, lambda x: np.asarray(x, dtype=np.float32), _numpy_candidates)
SAMPLERS = [TORCH, NUMPY]


@pytest.fixture(params=SAMPLERS, ids=[s.name for s in SAMPLERS])
def sampler(request: pytest.FixtureRequest) -> Sampler:
    return request.param


def _logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, vocab), dtype=np.float32) * np.float32(scale)


def _run(sampler: Sampler, states: list[Any], steps: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Sample `steps` tokens for every state; row logits depend only on (step, seed).  The batch is a
    read-only broadcast view (for numpy, any write to the caller's logits would raise)."""
    out: list[list[int]] = [[] for _ in states]
    for step in range(steps):
        row = _logits(1, vocab, seed=seed * 1000 + step)
        picks = sampler.sample(sampler.array(np.broadcast_to(row, (len(states), vocab))), states)
        for i, (s, t) in enumerate(zip(states, picks)):
            s.append(t)
            out[i].append(t)
    return out


def _draws(sampler: Sampler, logits_row: list[float], n: int, seed: int = 0, **kw: object) -> list[int]:
    vocab = len(logits_row)
    state = sampler.state(vocab, seed=seed, **kw)
    row = sampler.array([logits_row])
    return [sampler.sample(row, [state])[0] for _ in range(n)]


# --------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_logits_untouched(sampler: Sampler) -> None:
    logits = _logits(6, 100)
    logits[2, [7, 30, 60]] = 50.0  # ties: the first maximal index, as torch.argmax and numpy.argmax
    before = logits.copy()
    x = sampler.array(logits)
    picks = sampler.sample(x, [sampler.state(100, temperature=0.0) for _ in range(6)])
    assert picks == before.argmax(-1).tolist()
    assert picks[2] == 7
    assert np.array_equal(np.asarray(x), before)


def test_mixed_batch_greedy_rows_and_caller_logits_untouched(sampler: Sampler) -> None:
    logits = _logits(4, 100)
    logits[1, :10] = -math.inf
    logits[2, 5], logits[2, 40] = 12.0, 11.0  # token 5 (in the prompt) is the best before the penalty
    before = logits.copy()
    x = sampler.array(logits)
    states = [
        sampler.state(100, temperature=0.0),
        sampler.state(100, temperature=0.7, top_p=0.9, seed=1),
        sampler.state(100, temperature=0.0, repetition_penalty=1.3, prompt=(5, 6)),
        sampler.state(100, temperature=1.2, top_k=5, min_p=0.1, frequency_penalty=0.5, seed=2),
    ]
    picks = sampler.sample(x, states)
    assert np.array_equal(np.asarray(x), before)
    assert picks[0] == int(logits[0].argmax())
    assert all(0 <= t < 100 for t in picks)
    assert picks[1] >= 10
    assert int(logits[2].argmax()) == 5 and picks[2] == 40  # processed greedy row: 12 / 1.3 = 9.2 < 11
    assert picks[3] in set(np.argsort(-logits[3])[:5].tolist())


def test_top_k_one_is_greedy(sampler: Sampler) -> None:
    logits = _logits(5, 200, seed=3)
    states = [sampler.state(200, temperature=1.5, top_k=1, seed=i) for i in range(5)]
    assert states[0].greedy
    assert sampler.sample(sampler.array(logits), states) == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy(sampler: Sampler) -> None:
    for seed in range(20):
        logits = _logits(3, 500, seed=seed)
        states = [sampler.state(500, temperature=1.0, top_p=top_p, seed=seed * 10 + i) for i, top_p in
                  enumerate((1e-6, 1e-3, 0.0))]  # 0.0 (refused by the API): the best token still survives
        assert not states[0].greedy
        assert sampler.sample(sampler.array(logits), states) == logits.argmax(-1).tolist()


def test_tiny_temperature_is_greedy_without_overflow(sampler: Sampler) -> None:
    logits = _logits(2, 100) * np.float32(1e6)
    states = [sampler.state(100, temperature=1e-9, seed=1), sampler.state(100, temperature=1e-9, seed=2)]
    assert sampler.sample(sampler.array(logits), states) == logits.argmax(-1).tolist()


# --------------------------------------------------------------------------- seeds


PARAM_SETS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 20},
    {"temperature": 0.9, "top_k": 50, "top_p": 0.8, "min_p": 0.05},
    {"temperature": 1.0, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": 0.3,
     "repetition_penalty": 1.1},
]


def _mixed_batch(sampler: Sampler, vocab: int, params: dict) -> list[Any]:
    """A greedy row, then a seeded request of every PARAM_SETS, with (prompt (1, 2, 3), seed 1234, params)
    at index 3."""
    states = [sampler.state(vocab, seed=7 + i, **p) for i, p in enumerate(PARAM_SETS)]
    states.insert(2, sampler.state(vocab, prompt=(1, 2, 3), seed=1234, **params))
    states.insert(0, sampler.state(vocab, temperature=0.0))
    return states


@pytest.mark.parametrize("vocab", [300, 3000])
def test_same_seed_same_tokens_regardless_of_batch(sampler: Sampler, vocab: int) -> None:
    for params in PARAM_SETS:
        alone = _run(sampler, [sampler.state(vocab, prompt=(1, 2, 3), seed=1234, **params)], 25, vocab)[0]
        # the same request in the middle of a batch of other seeded requests with other params
        in_batch = _run(sampler, _mixed_batch(sampler, vocab, params), 25, vocab)[3]
        assert alone == in_batch, params
        assert len(set(alone)) > 1


def test_different_seeds_differ_and_same_seed_repeats(sampler: Sampler) -> None:
    runs = {seed: _run(sampler, [sampler.state(1000, seed=seed, temperature=1.0)], 30, 1000, seed=5)[0]
            for seed in (1, 2, 3)}
    assert runs[1] != runs[2] and runs[2] != runs[3] and runs[1] != runs[3]
    assert _run(sampler, [sampler.state(1000, seed=1, temperature=1.0)], 30, 1000, seed=5)[0] == runs[1]


def test_unseeded_and_extreme_seeds(sampler: Sampler) -> None:
    seeds = [None, -5, 2**64 - 1, 2**70]
    states = [sampler.state(100, seed=seed) for seed in seeds]
    assert 0 <= states[0].seed < 2**63 and states[1].seed == -5
    picks = sampler.sample(sampler.array(_logits(4, 100)), states)
    assert all(0 <= t < 100 for t in picks)
    # seeds are taken modulo 2**64
    for a, b in [(-5, 2**64 - 5), (2**70, 0), (2**64 - 1, -1)]:
        assert _run(sampler, [sampler.state(500, seed=a)], 10, 500) == _run(sampler, [sampler.state(500, seed=b)],
                                                                            10, 500)


# --------------------------------------------------------------------------- filters


def test_temperature_distribution(sampler: Sampler) -> None:
    probs = [0.5, 0.25, 0.15, 0.1]
    logits = [math.log(p) for p in probs]
    n = 4000
    for temp in (1.0, 0.5, 2.0):
        counts = np.bincount(_draws(sampler, logits, n, seed=11, temperature=temp), minlength=4)
        expected = np.array(probs) ** (1.0 / temp)
        expected /= expected.sum()  # softmax(log(p) / T)
        assert np.abs(counts / n - expected).max() < 0.03, (temp, counts, expected)


def _reference_support(row: np.ndarray, p: SamplingParams) -> set[int]:
    """Naive full-sort implementation of temperature -> top_k -> top_p -> min_p."""
    x = torch.from_numpy(row) / p.temperature
    vals, idx = torch.sort(x, descending=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    if 0 < p.top_k < len(row):
        keep[p.top_k:] = False
    probs = torch.softmax(vals.masked_fill(~keep, -math.inf).double(), dim=0)
    if p.top_p < 1.0:
        before = torch.cumsum(probs, 0) - probs
        keep &= ~(before >= p.top_p)
        keep[0] = True
    if p.min_p > 0:
        keep &= vals >= vals[0] + math.log(p.min_p)
    return set(idx[keep].tolist())


@pytest.mark.parametrize("kw", [{"temperature": 0.7}, {"temperature": 1.3, "top_k": 12},
                                {"temperature": 1.0, "top_p": 0.8}, {"temperature": 0.8, "min_p": 0.05}])
def test_frequencies_follow_the_filtered_softmax(sampler: Sampler, kw: dict) -> None:
    """Over a 40-token row: draw frequencies ~ softmax(logits / T) renormalized over the tokens the reference
    filters keep (total variation distance, loose bound: the seed is fixed, this cannot flake)."""
    vocab, n = 40, 8000
    row = _logits(1, vocab, seed=77, scale=1.5)[0]
    params = SamplingParams(**kw)
    keep = sorted(_reference_support(row, params))
    x = row.astype(np.float64)[keep] / params.temperature
    expected = np.zeros(vocab)
    expected[keep] = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    kept = len(keep)
    assert kept > 3 and (kept < vocab or set(kw) == {"temperature"})

    counts = np.bincount(_draws(sampler, row.tolist(), n, seed=3, **kw), minlength=vocab)
    assert set(np.flatnonzero(counts)) <= set(keep)
    assert 0.5 * np.abs(counts / n - expected).sum() < 0.04, (counts, expected)


def test_top_k_restricts_support(sampler: Sampler) -> None:
    logits = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]
    assert set(_draws(sampler, logits, 300, seed=1, top_k=3)) == {0, 1, 2}


def test_top_p_restricts_support(sampler: Sampler) -> None:
    # probs ~ [0.4, 0.3, 0.2, 0.1]: top_p=0.65 keeps tokens 0 and 1 (0.4 < 0.65 <= 0.7)
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    assert set(_draws(sampler, logits, 300, seed=2, top_p=0.65)) == {0, 1}
    assert set(_draws(sampler, logits, 400, seed=2, top_p=0.95)) == {0, 1, 2, 3}


def test_min_p_filters(sampler: Sampler) -> None:
    # p / p_max = [1, 0.6, 0.3, 0.1]; min_p 0.2 removes the last token only
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert set(_draws(sampler, logits, 500, seed=3, min_p=0.2)) == {0, 1, 2}
    assert set(_draws(sampler, logits, 500, seed=3)) == {0, 1, 2, 3}


def test_single_survivor_no_nan(sampler: Sampler) -> None:
    row = [10.0] + [-math.inf] * 9
    for kw in ({}, {"top_p": 0.5}, {"top_k": 3}, {"min_p": 0.9}, {"top_k": 5, "top_p": 0.3, "min_p": 0.5}):
        assert set(_draws(sampler, row, 20, seed=4, **kw)) == {0}
    row = [0.0, 30.0, 0.0, 0.0]  # everything filtered except the maximum
    assert set(_draws(sampler, row, 20, seed=5, min_p=0.5, top_p=0.9)) == {1}


def test_all_neg_inf_row_does_not_crash(sampler: Sampler) -> None:
    logits = sampler.array(np.full((3, 10), -math.inf))
    states = [sampler.state(10, seed=1), sampler.state(10, seed=2, top_p=0.5, top_k=3),
              sampler.state(10, seed=3, top_p=0.5)]
    with np.errstate(all="raise"):  # no (numpy) floating-point warning escapes either
        picks = sampler.sample(logits, states)
    assert all(0 <= t < 10 for t in picks)


def test_neg_inf_entries_never_sampled(sampler: Sampler) -> None:
    vocab = 2000
    rng = random.Random(0)
    for step in range(10):
        logits = _logits(len(PARAM_SETS), vocab, seed=100 + step)
        logits[:, rng.sample(range(vocab), vocab // 2)] = -math.inf
        states = [sampler.state(vocab, seed=step * 10 + i, **p) for i, p in enumerate(PARAM_SETS)]
        for t in sampler.sample(sampler.array(logits), states):
            assert math.isfinite(float(logits[0, t]))


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])  # flat (window growth) .. peaked (the window suffices)
def test_filters_match_reference(sampler: Sampler, scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    module = sampler.module
    fallbacks: list[int] = []  # window sizes of the retries with a larger window
    real_candidates = module._candidates

    def spy(x, params, min_window=module._TOP_P_WINDOW):  # type: ignore[no-untyped-def]
        if min_window > module._TOP_P_WINDOW:
            fallbacks.append(min_window)
        return real_candidates(x, params, min_window)

    monkeypatch.setattr(module, "_candidates", spy)
    vocab = 4000
    rng = random.Random(int(scale * 10))
    for trial in range(6):
        params = [
            SamplingParams(
                temperature=rng.choice([0.5, 1.0, 1.5]),
                top_k=rng.choice([0, 0, 5, 100, 2000]),
                top_p=rng.choice([1.0, 0.5, 0.9, 0.99]),
                min_p=rng.choice([0.0, 0.0, 0.05]),
            )
            for _ in range(4)
        ]
        params = [p for p in params if 0 < p.top_k < vocab or p.top_p < 1.0] or [SamplingParams(top_p=0.9)]
        logits = _logits(len(params), vocab, seed=trial, scale=scale)
        x = logits / np.array([p.temperature for p in params], dtype=np.float32)[:, None]
        for r, (p, (vals, idx)) in enumerate(zip(params, sampler.candidates(x, params))):
            got = set(idx[np.isfinite(vals)].tolist())
            ref = _reference_support(logits[r], p)
            # float32 vs float64 cumsum may disagree on a token sitting exactly at the top_p edge
            assert len(got ^ ref) <= 1, (p, len(got), len(ref))
            assert idx[0] == int(logits[r].argmax())
            finite = vals[np.isfinite(vals)]
            assert np.all(np.diff(finite) <= 0) and np.all(np.isneginf(vals[len(finite):]))  # sorted, suffix
    if scale == 0.3:
        assert fallbacks  # flat distributions: the nucleus does not fit in the top-k window
    if scale == 8.0:
        assert not fallbacks


# --------------------------------------------------------------------------- penalties & min_tokens


def test_repetition_penalty_divides_positive_multiplies_negative(sampler: Sampler) -> None:
    row = sampler.array([[2.0, 1.9, -1.0, -1.1]])
    # token 0 in the prompt: 2.0 / 1.2 = 1.67 < 1.9 -> argmax moves to 1
    assert sampler.sample(row, [sampler.state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.2)]) == [1]
    # negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1
    row2 = sampler.array([[-1.0, -1.1, -5.0, -5.0]])
    assert sampler.sample(row2, [sampler.state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.2)]) == [1]
    # output tokens count too
    s = sampler.state(4, temperature=0.0, repetition_penalty=1.2)
    assert sampler.sample(row, [s]) == [0]
    s.append(0)
    assert sampler.sample(row, [s]) == [1]


def test_presence_and_frequency_penalties_use_output_only(sampler: Sampler) -> None:
    row = sampler.array([[2.0, 1.9, 0.0, 0.0]])
    s = sampler.state(4, prompt=(0, 0, 0), temperature=0.0, presence_penalty=0.5)
    assert sampler.sample(row, [s]) == [0]  # prompt does not count
    s.append(0)
    assert sampler.sample(row, [s]) == [1]  # 2.0 - 0.5 < 1.9

    f = sampler.state(4, temperature=0.0, frequency_penalty=0.06)
    f.append(0)
    assert sampler.sample(row, [f]) == [0]  # 2.0 - 0.06 > 1.9
    f.append(0)
    assert sampler.sample(row, [f]) == [1]  # 2.0 - 0.12 < 1.9


def test_min_tokens_masks_eos_and_stop_token_ids(sampler: Sampler) -> None:
    row = sampler.array([[0.0, 0.0, 9.0, 8.0, 1.0]])  # EOS=2 best, then stop token 3
    s = sampler.state(5, temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    assert sampler.sample(row, [s]) == [4]
    s.append(4)
    assert s.min_tokens_active and sampler.sample(row, [s]) == [4]
    s.append(4)
    assert not s.min_tokens_active and sampler.sample(row, [s]) == [2]  # min_tokens reached


def test_min_tokens_with_sampling_and_ignore_eos_does_not_mask(sampler: Sampler) -> None:
    row = [0.0, 0.0, 20.0, 0.0]
    assert set(_draws(sampler, row, 60, seed=9, min_tokens=1000)) == {0, 1, 3}
    s = sampler.state(4, temperature=0.0, ignore_eos=True)
    assert sampler.sample(sampler.array([row]), [s]) == [2]


def test_min_tokens_multiple_eos_ids(sampler: Sampler) -> None:
    row = sampler.array([[0.0, 7.0, 9.0, 8.0]])
    assert sampler.sample(row, [sampler.state(4, eos=(1, 2), temperature=0.0, min_tokens=1)]) == [3]


def test_logit_bias_adds_to_the_listed_logits(sampler: Sampler) -> None:
    row = sampler.array([[3.0, 2.0, 1.0, 0.0]])
    assert sampler.sample(row, [sampler.state(4, temperature=0.0, logit_bias=((0, -1.5),))]) == [1]  # 1.5 < 2
    s = sampler.state(4, temperature=0.0, logit_bias=((0, -0.5), (3, 2.6)))
    assert sampler.sample(row, [s]) == [3]  # 2.6 > 2.5
    assert row.tolist() == [[3.0, 2.0, 1.0, 0.0]]  # the caller's logits are untouched
    # -100 bans a token from sampling, +100 makes it all but certain, whatever the filters
    assert 0 not in _draws(sampler, [3.0, 2.0, 1.0, 0.0], 200, seed=1, logit_bias=((0, -100.0),))
    assert set(_draws(sampler, [3.0, 2.0, 1.0, 0.0], 50, seed=2, top_p=0.9, logit_bias=((2, 100.0),))) == {2}
    # ids beyond the logits row (checked by the API) are ignored here, never an index error
    assert sampler.sample(row, [sampler.state(4, temperature=0.0, logit_bias=((9, 50.0),))]) == [0]


def test_logit_bias_comes_before_penalties(sampler: Sampler) -> None:
    # token 0 in the prompt, repetition penalty 1.1, bias +1.2: bias first gives (1.0 + 1.2) / 1.1 = 2.0,
    # below token 1's 2.05; the penalty first would give 1.0 / 1.1 + 1.2 = 2.11 and pick token 0.
    row = sampler.array([[1.0, 2.05, 0.0, 0.0]])
    s = sampler.state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.1, logit_bias=((0, 1.2),))
    assert sampler.sample(row, [s]) == [1]
    s = sampler.state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.1, logit_bias=((0, 1.3),))
    assert sampler.sample(row, [s]) == [0]  # (1.0 + 1.3) / 1.1 = 2.09


def test_shape_mismatch_raises_and_empty_batch(sampler: Sampler) -> None:
    with pytest.raises(ValueError):
        sampler.sample(sampler.array(np.zeros((2, 5))), [sampler.state(5)])
    with pytest.raises(ValueError):
        sampler.sample(sampler.array(np.zeros(5)), [sampler.state(5)])
    assert sampler.sample(sampler.array(np.zeros((0, 5))), []) == []


# --------------------------------------------------------------------------- logprobs


def test_logprobs_of_small_rows(sampler: Sampler) -> None:
    logprobs_of = sampler.module.logprobs_of
    assert sampler.module.MIN_LOGPROB == MIN_LOGPROB
    logits = sampler.array([[0.0, math.log(3.0), -math.inf], [2.0, 2.0, 2.0]])
    a, b = logprobs_of(logits, [0, 2], [2, 0])
    assert a.token_id == 0 and a.logprob == pytest.approx(math.log(0.25))
    assert [t for t, _ in a.top] == [1, 0] and a.top[0][1] == pytest.approx(math.log(0.75))
    assert b.logprob == pytest.approx(-math.log(3.0)) and b.top == ()
    c, = logprobs_of(logits[:1], [2], [3])  # impossible token: finite floor, as OpenAI reports it
    assert c.logprob == MIN_LOGPROB and [t for t, _ in c.top] == [1, 0, 2] and c.top[2][1] == MIN_LOGPROB
    d, = logprobs_of(logits[1:], [1], [5])  # more alternatives than tokens: the whole row
    assert sorted(t for t, _ in d.top) == [0, 1, 2] and all(v == pytest.approx(-math.log(3.0)) for _, v in d.top)
    assert isinstance(a.logprob, float) and all(type(t) is int and type(v) is float for t, v in a.top)
    assert logprobs_of(logits[:0], [], []) == []
    with pytest.raises(ValueError):
        logprobs_of(logits, [0], [1])
