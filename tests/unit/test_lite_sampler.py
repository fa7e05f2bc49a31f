"""Tests for app.lite.sampler, the numpy port of app.engine.sampler (all seeded and deterministic).

Where the two samplers must agree (greedy picks, processed logits, the support of the filters,
logprobs) the numpy sampler is compared with the torch one on the same logits."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import app.engine.sampler as torch_sampler
import app.lite.sampler as lite
from app.engine.grammar import Constraint, grammar_tokenizer, json_grammar
from app.engine.types import SamplingParams
from app.lite.sampler import MIN_LOGPROB, SamplingState, logprobs_of, sample

EOS = 2
REPO = Path(__file__).resolve().parents[2]


def _state(vocab: int = 50, prompt: tuple[int, ...] = (), eos: tuple[int, ...] = (EOS,), **kw: object
           ) -> SamplingState:
    return SamplingState(SamplingParams(**kw), list(prompt), vocab, list(eos))


def _torch_state(vocab: int = 50, prompt: tuple[int, ...] = (), eos: tuple[int, ...] = (EOS,), **kw: object
                 ) -> torch_sampler.SamplingState:
    return torch_sampler.SamplingState(SamplingParams(**kw), list(prompt), vocab, list(eos))


def _logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, vocab), dtype=np.float32) * np.float32(scale)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: the torch side cannot touch x


def _run(states: list[SamplingState], steps: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Sample `steps` tokens for every state; row logits depend only on (step, seed).  The batch is a
    read-only broadcast view: any write to the caller's logits would raise."""
    out: list[list[int]] = [[] for _ in states]
    for step in range(steps):
        row = _logits(1, vocab, seed=seed * 1000 + step)
        picks = sample(np.broadcast_to(row, (len(states), vocab)), states)
        for i, (s, t) in enumerate(zip(states, picks)):
            s.append(t)
            out[i].append(t)
    return out


def _draws(logits_row: list[float], n: int, seed: int = 0, **kw: object) -> list[int]:
    vocab = len(logits_row)
    state = _state(vocab, seed=seed, **kw)
    row = np.array([logits_row], dtype=np.float32)
    return [sample(row, [state])[0] for _ in range(n)]


# --------------------------------------------------------------------------- API


def test_same_state_attributes_as_the_torch_sampler() -> None:
    assert set(SamplingState.__slots__) == set(torch_sampler.SamplingState.__slots__)
    for name in ("min_tokens_active", "grammar_finished", "needs_processing"):
        assert isinstance(getattr(SamplingState, name), property)
    kw = {"temperature": 0.7, "seed": 5, "min_tokens": 2, "presence_penalty": 0.1, "logit_bias": ((1, 2.0),)}
    a, b = _state(10, **kw), _torch_state(10, **kw)
    for s in (a, b):
        s.append(3)
    for name in ("vocab_size", "seed", "greedy", "num_output_tokens", "has_penalties", "min_tokens_active",
                 "grammar_finished", "needs_processing", "constraint", "params"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.min_tokens_active and a.needs_processing and not a.grammar_finished
    a.append(4)
    assert not a.min_tokens_active and a.num_output_tokens == 2
    assert not _state(10, temperature=0.0).needs_processing
    assert _state(10, top_k=1).greedy and _state(10, temperature=1e-6).greedy and not _state(10).greedy


def test_sample_does_not_append_and_draws_one_uniform_per_sampled_row() -> None:
    states = [_state(100, seed=11), _state(100, temperature=0.0, seed=12), _state(100, seed=13, top_p=0.5)]
    logits = _logits(3, 100)
    for _ in range(3):
        sample(logits, states)
    assert [s.num_output_tokens for s in states] == [0, 0, 0]
    for s, used in zip(states, (3, 0, 3)):  # greedy rows never touch their generator
        g = np.random.Generator(np.random.PCG64(s.seed))
        g.random(used)
        assert s.generator.random() == g.random()


def test_inverse_cdf_with_the_rows_own_uniform() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    row = np.log(probs).astype(np.float32)[None]
    for seed in range(50):
        u = np.random.Generator(np.random.PCG64(seed)).random()
        expected = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        assert sample(row, [_state(4, seed=seed)]) == [expected]


# --------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_like_torch_and_logits_untouched() -> None:
    logits = _logits(6, 100)
    logits[2, [7, 30, 60]] = 50.0  # ties: the first maximal index, as torch.argmax
    before = logits.copy()
    states = [_state(100, temperature=0.0) for _ in range(6)]
    picks = sample(logits, states)
    assert picks == logits.argmax(-1).tolist() == torch.from_numpy(logits).argmax(-1).tolist()
    assert picks[2] == 7
    assert np.array_equal(logits, before)


def test_mixed_batch_greedy_rows_and_caller_array_untouched() -> None:
    logits = _logits(4, 100)
    logits[1, :10] = -math.inf
    before = logits.copy()
    params = [
        {"temperature": 0.0},
        {"temperature": 0.7, "top_p": 0.9, "seed": 1},
        {"temperature": 0.0, "repetition_penalty": 1.3, "prompt": (5, 6)},
        {"temperature": 1.2, "top_k": 5, "min_p": 0.1, "frequency_penalty": 0.5, "seed": 2},
    ]
    picks = sample(logits, [_state(100, **p) for p in params])
    ref = torch_sampler.sample(_t(logits), [_torch_state(100, **p) for p in params])
    assert np.array_equal(logits, before)
    assert picks[0] == int(logits[0].argmax()) == ref[0]
    assert picks[2] == ref[2]  # processed greedy row
    assert all(0 <= t < 100 for t in picks)
    assert picks[1] >= 10
    assert picks[3] in set(np.argsort(-logits[3])[:5].tolist())


def test_top_k_one_is_greedy() -> None:
    logits = _logits(5, 200, seed=3)
    states = [_state(200, temperature=1.5, top_k=1, seed=i) for i in range(5)]
    assert states[0].greedy
    assert sample(logits, states) == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy() -> None:
    for seed in range(20):
        logits = _logits(3, 500, seed=seed)
        states = [_state(500, temperature=1.0, top_p=top_p, seed=seed * 10 + i) for i, top_p in
                  enumerate((1e-6, 1e-3, 0.0))]  # 0.0 (refused by the API): the best token still survives
        assert not states[0].greedy
        assert sample(logits, states) == logits.argmax(-1).tolist()


def test_tiny_temperature_is_greedy_without_overflow() -> None:
    logits = _logits(2, 100) * np.float32(1e6)
    states = [_state(100, temperature=1e-9, seed=1), _state(100, temperature=1e-9, seed=2)]
    assert sample(logits, states) == logits.argmax(-1).tolist()


GREEDY_PARAM_SETS = [
    {},
    {"repetition_penalty": 1.3},
    {"presence_penalty": 0.8, "frequency_penalty": 0.4},
    {"repetition_penalty": 0.9, "frequency_penalty": -0.3},
    {"min_tokens": 6, "stop_token_ids": (7, 11)},
    {"logit_bias": ((3, 2.5), (9, -100.0), (3, 0.5), (500, 9.0))},
    {"repetition_penalty": 1.1, "presence_penalty": 0.3, "logit_bias": ((4, 1.0),), "min_tokens": 3},
]


@pytest.mark.parametrize("params", GREEDY_PARAM_SETS)
def test_greedy_generation_identical_to_torch(params: dict) -> None:
    """Penalties, bias and min_tokens feed back through append(): 40 greedy steps must follow torch's."""
    vocab = 64
    prompt = (1, 5, 5, 9, 40)
    ours = _state(vocab, prompt=prompt, temperature=0.0, **params)
    theirs = _torch_state(vocab, prompt=prompt, temperature=0.0, **params)
    got, want = [], []
    for step in range(40):
        row = _logits(1, vocab, seed=500 + step, scale=1.5)
        row[0, EOS] += 2.0  # EOS is often the best token: min_tokens matters
        a, = sample(row, [ours])
        b, = torch_sampler.sample(_t(row), [theirs])
        ours.append(a)
        theirs.append(b)
        got.append(a)
        want.append(b)
    assert got == want
    assert len(set(got)) > 3  # the penalties and the moving logits make it a real sequence


# --------------------------------------------------------------------------- processing


PROCESS_PARAM_SETS = [
    {"repetition_penalty": 1.25},
    {"repetition_penalty": 0.8},
    {"presence_penalty": 0.7},
    {"frequency_penalty": 0.35},
    {"presence_penalty": -0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.05},
    {"logit_bias": ((0, 5.0), (0, -1.5), (17, -100.0), (99, 100.0), (10_000, 3.0))},
    {"min_tokens": 10, "stop_token_ids": (3, 4, 10_000)},
    {"min_tokens": 1, "ignore_eos": True, "logit_bias": ((2, 7.0),), "repetition_penalty": 1.4},
]


@pytest.mark.parametrize("params", PROCESS_PARAM_SETS)
def test_processed_logits_identical_to_torch(params: dict) -> None:
    vocab = 300
    prompt = (0, 1, 2, 3, 5, 8, 13)
    ours, theirs = _state(vocab, prompt=prompt, **params), _torch_state(vocab, prompt=prompt, **params)
    for step, token in enumerate([20, 21, 20, 5, 20, 299, 2]):
        assert ours.needs_processing == theirs.needs_processing
        row = _logits(1, vocab, seed=step)[0]
        row[50:60] = -math.inf
        mine, ref = row.copy(), _t(row)
        ours._apply(mine)
        theirs._apply(ref)
        np.testing.assert_array_equal(mine, ref.numpy())
        ours.append(token)
        theirs.append(token)


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    row = np.array([[2.0, 1.9, -1.0, -1.1]], dtype=np.float32)
    # token 0 in the prompt: 2.0 / 1.2 = 1.67 < 1.9 -> argmax moves to 1
    assert sample(row, [_state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.2)]) == [1]
    # negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1
    row2 = np.array([[-1.0, -1.1, -5.0, -5.0]], dtype=np.float32)
    assert sample(row2, [_state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.2)]) == [1]
    # output tokens count too
    s = _state(4, temperature=0.0, repetition_penalty=1.2)
    assert sample(row, [s]) == [0]
    s.append(0)
    assert sample(row, [s]) == [1]


def test_presence_and_frequency_penalties_use_output_only() -> None:
    row = np.array([[2.0, 1.9, 0.0, 0.0]], dtype=np.float32)
    s = _state(4, prompt=(0, 0, 0), temperature=0.0, presence_penalty=0.5)
    assert sample(row, [s]) == [0]  # prompt does not count
    s.append(0)
    assert sample(row, [s]) == [1]  # 2.0 - 0.5 < 1.9

    f = _state(4, temperature=0.0, frequency_penalty=0.06)
    f.append(0)
    assert sample(row, [f]) == [0]  # 2.0 - 0.06 > 1.9
    f.append(0)
    assert sample(row, [f]) == [1]  # 2.0 - 0.12 < 1.9


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    row = np.array([[0.0, 0.0, 9.0, 8.0, 1.0]], dtype=np.float32)  # EOS=2 best, then stop token 3
    s = _state(5, temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    assert sample(row, [s]) == [4]
    s.append(4)
    assert s.min_tokens_active and sample(row, [s]) == [4]
    s.append(4)
    assert not s.min_tokens_active and sample(row, [s]) == [2]  # min_tokens reached


def test_min_tokens_with_sampling_and_ignore_eos_does_not_mask() -> None:
    row = [0.0, 0.0, 20.0, 0.0]
    drawn = _draws(row, 60, seed=9, min_tokens=1000)
    assert set(drawn) == {0, 1, 3}
    s = _state(4, temperature=0.0, ignore_eos=True)
    assert sample(np.array([row], dtype=np.float32), [s]) == [2]


def test_min_tokens_multiple_eos_ids() -> None:
    row = np.array([[0.0, 7.0, 9.0, 8.0]], dtype=np.float32)
    assert sample(row, [_state(4, eos=(1, 2), temperature=0.0, min_tokens=1)]) == [3]


def test_logit_bias_adds_to_the_listed_logits() -> None:
    row = np.array([[3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    assert sample(row, [_state(4, temperature=0.0, logit_bias=((0, -1.5),))]) == [1]  # 1.5 < 2.0
    assert sample(row, [_state(4, temperature=0.0, logit_bias=((0, -0.5), (3, 2.6)))]) == [3]  # 2.6 > 2.5
    assert row.tolist() == [[3.0, 2.0, 1.0, 0.0]]  # the caller's logits are untouched
    # -100 bans a token from sampling, +100 makes it all but certain, whatever the filters
    assert 0 not in _draws([3.0, 2.0, 1.0, 0.0], 200, seed=1, logit_bias=((0, -100.0),))
    assert set(_draws([3.0, 2.0, 1.0, 0.0], 50, seed=2, top_p=0.9, logit_bias=((2, 100.0),))) == {2}
    # ids beyond the logits row (checked by the API) are ignored here, never an index error
    assert sample(row, [_state(4, temperature=0.0, logit_bias=((9, 50.0),))]) == [0]


def test_logit_bias_comes_before_penalties() -> None:
    # bias first: (1.0 + 1.2) / 1.1 = 2.0 < 2.05; penalty first would give 1.0 / 1.1 + 1.2 = 2.11
    row = np.array([[1.0, 2.05, 0.0, 0.0]], dtype=np.float32)
    s = _state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.1, logit_bias=((0, 1.2),))
    assert sample(row, [s]) == [1]
    s = _state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.1, logit_bias=((0, 1.3),))
    assert sample(row, [s]) == [0]  # (1.0 + 1.3) / 1.1 = 2.09


def test_shape_mismatch_raises_and_empty_batch() -> None:
    with pytest.raises(ValueError):
        sample(np.zeros((2, 5), dtype=np.float32), [_state(5)])
    with pytest.raises(ValueError):
        sample(np.zeros(5, dtype=np.float32), [_state(5)])
    assert sample(np.zeros((0, 5), dtype=np.float32), []) == []


# --------------------------------------------------------------------------- seeds


PARAM_SETS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 20},
    {"temperature": 0.9, "top_k": 50, "top_p": 0.8, "min_p": 0.05},
    {"temperature": 1.0, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": 0.3,
     "repetition_penalty": 1.1},
]


@pytest.mark.parametrize("vocab", [300, 3000])
def test_same_seed_same_tokens_regardless_of_batch_and_order(vocab: int) -> None:
    for params in PARAM_SETS:
        alone = _run([_state(vocab, prompt=(1, 2, 3), seed=1234, **params)], 25, vocab)[0]
        # the same request in the middle of a batch of other seeded requests with other params
        others = [_state(vocab, seed=7 + i, **p) for i, p in enumerate(PARAM_SETS)]
        others.insert(2, _state(vocab, prompt=(1, 2, 3), seed=1234, **params))
        others.insert(0, _state(vocab, temperature=0.0))
        in_batch = _run(others, 25, vocab)
        assert alone == in_batch[3], params
        # the same batch in reverse order: every row gets the same tokens
        again = [_state(vocab, seed=7 + i, **p) for i, p in enumerate(PARAM_SETS)]
        again.insert(2, _state(vocab, prompt=(1, 2, 3), seed=1234, **params))
        again.insert(0, _state(vocab, temperature=0.0))
        assert _run(again[::-1], 25, vocab)[::-1] == in_batch, params
        assert len(set(alone)) > 1


def test_different_seeds_differ_and_same_seed_repeats() -> None:
    runs = {seed: _run([_state(1000, seed=seed, temperature=1.0)], 30, 1000, seed=5)[0] for seed in (1, 2, 3)}
    assert runs[1] != runs[2] and runs[2] != runs[3] and runs[1] != runs[3]
    assert _run([_state(1000, seed=1, temperature=1.0)], 30, 1000, seed=5)[0] == runs[1]


def test_unseeded_and_extreme_seeds() -> None:
    seeds = [None, -5, 2**64 - 1, 2**70]
    states = [_state(100, seed=seed) for seed in seeds]
    assert 0 <= states[0].seed < 2**63 and states[1].seed == -5
    picks = sample(_logits(4, 100), states)
    assert all(0 <= t < 100 for t in picks)
    # seeds are taken modulo 2**64
    same = [(-5, 2**64 - 5), (2**70, 0), (2**64 - 1, -1)]
    for a, b in same:
        assert _run([_state(500, seed=a)], 10, 500) == _run([_state(500, seed=b)], 10, 500)


# --------------------------------------------------------------------------- filters


def test_temperature_distribution() -> None:
    probs = [0.5, 0.25, 0.15, 0.1]
    logits = [math.log(p) for p in probs]
    n = 4000
    for temp in (1.0, 0.5, 2.0):
        counts = np.bincount(_draws(logits, n, seed=11, temperature=temp), minlength=4)
        expected = torch.softmax(torch.tensor(logits) / temp, dim=0).numpy()
        assert np.abs(counts / n - expected).max() < 0.03, (temp, counts, expected)


@pytest.mark.parametrize("kw", [{"temperature": 0.7}, {"temperature": 1.3, "top_k": 12},
                                {"temperature": 1.0, "top_p": 0.8}, {"temperature": 0.8, "min_p": 0.05}])
def test_frequencies_follow_the_filtered_softmax(kw: dict) -> None:
    """Over a 40-token row: draw frequencies ~ softmax(logits / T) renormalized over the tokens torch's
    filters keep (total variation distance, loose bound: the seed is fixed, this cannot flake)."""
    vocab, n = 40, 8000
    row = _logits(1, vocab, seed=77, scale=1.5)[0]
    params = SamplingParams(**kw)
    x = _t(row) / params.temperature
    if torch_sampler._has_rank_filter(params, vocab):
        vals, idx = torch_sampler._candidates(x[None].clone(), [params])
        keep = idx[0][torch.isfinite(vals[0])]
    else:
        xs = x[None].clone()
        torch_sampler._apply_min_p(xs, [params.min_p], xs.max(dim=-1, keepdim=True).values)
        keep = torch.isfinite(xs[0]).nonzero().squeeze(1)
    expected = np.zeros(vocab)
    expected[keep.numpy()] = torch.softmax(x[keep].double(), dim=0).numpy()
    kept = int((expected > 0).sum())
    assert kept > 3 and (kept < vocab or set(kw) == {"temperature"})

    counts = np.bincount(_draws(row.tolist(), n, seed=3, **kw), minlength=vocab)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))
    assert 0.5 * np.abs(counts / n - expected).sum() < 0.04, (counts, expected)


def test_top_k_restricts_support() -> None:
    logits = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]
    assert set(_draws(logits, 300, seed=1, top_k=3)) == {0, 1, 2}


def test_top_p_restricts_support() -> None:
    # probs ~ [0.4, 0.3, 0.2, 0.1]: top_p=0.65 keeps tokens 0 and 1 (0.4 < 0.65 <= 0.7)
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    assert set(_draws(logits, 300, seed=2, top_p=0.65)) == {0, 1}
    assert set(_draws(logits, 400, seed=2, top_p=0.95)) == {0, 1, 2, 3}


def test_min_p_filters() -> None:
    # p / p_max = [1, 0.6, 0.3, 0.1]; min_p 0.2 removes the last token only
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert set(_draws(logits, 500, seed=3, min_p=0.2)) == {0, 1, 2}
    assert set(_draws(logits, 500, seed=3)) == {0, 1, 2, 3}


def test_top_k_ties_keep_the_lowest_ids() -> None:
    logits = [1.0, 5.0, 5.0, 0.0, 5.0, 5.0]
    assert set(_draws(logits, 200, seed=6, top_k=3)) == {1, 2, 4}


def test_single_survivor_no_nan() -> None:
    row = [10.0] + [-math.inf] * 9
    for kw in ({}, {"top_p": 0.5}, {"top_k": 3}, {"min_p": 0.9}, {"top_k": 5, "top_p": 0.3, "min_p": 0.5}):
        assert set(_draws(row, 20, seed=4, **kw)) == {0}
    row = [0.0, 30.0, 0.0, 0.0]  # everything filtered except the maximum
    assert set(_draws(row, 20, seed=5, min_p=0.5, top_p=0.9)) == {1}


def test_all_neg_inf_row_does_not_crash() -> None:
    logits = np.full((3, 10), -math.inf, dtype=np.float32)
    states = [_state(10, seed=1), _state(10, seed=2, top_p=0.5, top_k=3), _state(10, seed=3, top_p=0.5)]
    with np.errstate(all="raise"):  # no floating-point warning escapes either
        picks = sample(logits, states)
    assert all(0 <= t < 10 for t in picks)


def test_neg_inf_entries_never_sampled() -> None:
    vocab = 2000
    rng = random.Random(0)
    for step in range(10):
        logits = _logits(len(PARAM_SETS), vocab, seed=100 + step)
        logits[:, rng.sample(range(vocab), vocab // 2)] = -math.inf
        states = [_state(vocab, seed=step * 10 + i, **p) for i, p in enumerate(PARAM_SETS)]
        for t in sample(logits, states):
            assert math.isfinite(float(logits[0, t]))


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


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])  # flat (window growth) .. peaked (window suffices)
def test_filters_match_torch_and_reference(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    fallbacks: list[int] = []  # window sizes of the retries with a larger window
    real_candidates = lite._candidates

    def spy(x, p, min_window=lite._TOP_P_WINDOW):  # type: ignore[no-untyped-def]
        if min_window > lite._TOP_P_WINDOW:
            fallbacks.append(min_window)
        return real_candidates(x, p, min_window)

    monkeypatch.setattr(lite, "_candidates", spy)
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
        x = _t(logits) / torch.tensor([p.temperature for p in params]).unsqueeze(1)
        t_vals, t_idx = torch_sampler._candidates(x.clone(), params)
        for r, p in enumerate(params):
            row = logits[r] / np.float32(p.temperature)
            vals, idx = lite._candidates(row.copy(), p)
            got = set(idx[np.isfinite(vals)].tolist())
            assert got == set(t_idx[r][torch.isfinite(t_vals[r])].tolist()), p
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


@pytest.mark.parametrize("kw", [
    {"temperature": 0.8, "top_k": 30, "repetition_penalty": 1.3},
    {"temperature": 1.2, "top_p": 0.7, "presence_penalty": 1.0, "frequency_penalty": 0.5},
    {"temperature": 0.9, "min_p": 0.08, "logit_bias": ((11, 4.0), (12, -100.0)), "min_tokens": 5},
    {"temperature": 1.0, "top_k": 60, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 0.9,
     "frequency_penalty": 0.2},
])
def test_drawable_tokens_after_processing_match_torch(kw: dict) -> None:
    """Penalties/bias/min_tokens, then temperature and filters: the set of tokens that can be drawn is
    torch's, and sampled tokens (numpy's stream) always fall in it."""
    vocab = 500
    prompt = (11, 12, 13, 40, 41)
    ours = _state(vocab, prompt=prompt, seed=8, **kw)
    theirs = _torch_state(vocab, prompt=prompt, seed=8, **kw)
    for step in range(8):
        row = _logits(1, vocab, seed=900 + step, scale=2.5)[0]
        row[EOS] = 6.0  # min_tokens must remove it

        mine, ref = row.copy(), _t(row)
        ours._apply(mine)
        theirs._apply(ref)
        p = ours.params
        mine /= np.float32(p.temperature)
        ref = (ref / torch.tensor([p.temperature], dtype=torch.float32))[None]
        if lite._has_rank_filter(p, vocab):
            vals, idx = lite._candidates(mine, p)
            support = set(idx[np.isfinite(vals)].tolist())
            t_vals, t_idx = torch_sampler._candidates(ref.clone(), [p])
            t_support = set(t_idx[0][torch.isfinite(t_vals[0])].tolist())
        else:
            lite._apply_min_p(mine, p.min_p, mine.max())
            support = set(np.flatnonzero(np.isfinite(mine)).tolist())
            torch_sampler._apply_min_p(ref, [p.min_p], ref.max(dim=-1, keepdim=True).values)
            t_support = set(torch.isfinite(ref[0]).nonzero().squeeze(1).tolist())
        assert support == t_support and len(support) > 1
        if ours.min_tokens_active:
            assert EOS not in support

        token, = sample(row[None], [ours])
        assert token in support
        ours.append(token)
        theirs.append(token)


# --------------------------------------------------------------------------- logprobs


def test_logprobs_of_small_rows() -> None:
    logits = np.array([[0.0, math.log(3.0), -math.inf], [2.0, 2.0, 2.0]], dtype=np.float32)
    a, b = logprobs_of(logits, [0, 2], [2, 0])
    assert a.token_id == 0 and a.logprob == pytest.approx(math.log(0.25))
    assert [t for t, _ in a.top] == [1, 0] and a.top[0][1] == pytest.approx(math.log(0.75))
    assert b.logprob == pytest.approx(-math.log(3.0)) and b.top == ()
    c, = logprobs_of(logits[:1], [2], [3])  # impossible token: finite floor, as OpenAI reports it
    assert c.logprob == MIN_LOGPROB and [t for t, _ in c.top] == [1, 0, 2] and c.top[2][1] == MIN_LOGPROB
    d, = logprobs_of(logits[1:], [1], [5])  # more alternatives than tokens: the whole row, ties by id
    assert [t for t, _ in d.top] == [0, 1, 2] and all(v == pytest.approx(-math.log(3.0)) for _, v in d.top)
    assert isinstance(a.logprob, float) and all(type(t) is int and type(v) is float for t, v in a.top)
    assert logprobs_of(logits[:0], [], []) == []
    with pytest.raises(ValueError):
        logprobs_of(logits, [0], [1])
    with pytest.raises(IndexError):
        logprobs_of(logits[:1], [3], [1])


@pytest.mark.parametrize("scale", [1.0, 4.0, 12.0])
def test_logprobs_match_torch(scale: float) -> None:
    rows, vocab = 12, 5000
    logits = _logits(rows, vocab, seed=int(scale * 7), scale=scale)
    logits[3, :4000] = -math.inf  # a row with few possible tokens
    logits[5, 100:110] = 0.0  # a flat patch
    rng = random.Random(1)
    targets = [rng.randrange(vocab) for _ in range(rows)]
    targets[3] = 5  # a -inf token: MIN_LOGPROB
    num_top = [0, 1, 5, 20, 3, 0, 8, 1, 20, 2, 0, 7]
    before = logits.copy()
    got = logprobs_of(logits, targets, num_top)
    want = torch_sampler.logprobs_of(_t(logits), targets, num_top)
    assert np.array_equal(logits, before)
    assert got[3].logprob == want[3].logprob == MIN_LOGPROB
    for g, w, n in zip(got, want, num_top):
        assert g.token_id == w.token_id
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
        assert len(g.top) == len(w.top) == n
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
        np.testing.assert_allclose([v for _, v in g.top], [v for _, v in w.top], atol=1e-5, rtol=0)


def test_logprobs_ties_are_ordered_by_id() -> None:
    """torch.topk leaves the order of equal values unspecified; here it is by token id.  Values and the
    set of ids (when the tied group fits) are torch's."""
    row = np.zeros((1, 3000), dtype=np.float32)
    row[0, [2500, 7, 1200, 42]] = 3.0
    row[0, 10] = 5.0
    got, = logprobs_of(row, [0], [5])
    want, = torch_sampler.logprobs_of(_t(row), [0], [5])
    assert [t for t, _ in got.top] == [10, 7, 42, 1200, 2500]
    assert {t for t, _ in got.top} == {t for t, _ in want.top}
    np.testing.assert_allclose([v for _, v in got.top], [v for _, v in want.top], atol=1e-5)
    # a tie straddling the cut keeps the lowest ids
    cut, = logprobs_of(row, [0], [3])
    assert [t for t, _ in cut.top] == [10, 7, 42]


# --------------------------------------------------------------------------- grammar

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
                   "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
TEXT = ['{"name":"bob","age":42,"ok":true}\n', '{"name":"alice","age":7,"ok":false}\n',
        '{"a":[1,2,3],"b":null}\n', "the cat sat on the mat, said hello to the world\n"] * 20


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE (`tokenizers`, as the demo models'), its logits width and EOS id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer=trainer)
    vocab = tok.get_vocab_size() + 6  # padded logits rows, as many models have
    return tok, vocab, 0, grammar_tokenizer(tok, vocab, [0])


def _allowed(constraint: Constraint, vocab: int) -> np.ndarray:
    row = np.zeros(vocab, dtype=np.float32)
    constraint.mask_(row)
    return np.isfinite(row)


def test_grammar_mask_on_numpy_and_torch_rows_agree(bpe) -> None:
    _tok, vocab, _eos, ll = bpe
    c = Constraint(ll, json_grammar(SCHEMA))
    row = _logits(1, vocab, seed=4)[0]
    mine, theirs = row.copy(), _t(row)
    c.mask_(mine)
    c.mask_(theirs)
    np.testing.assert_array_equal(mine, theirs.numpy())
    assert 0 < np.isfinite(mine).sum() < vocab and not np.isfinite(mine[vocab - 6:]).any()


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_grammar_row_never_draws_a_disallowed_token(bpe, temperature: float) -> None:
    """A grammar row sampled in a batch with ordinary rows: every draw is allowed by a mirror of the
    grammar, min_tokens does not apply to it, and the text is compact JSON following the schema."""
    tok, vocab, eos, ll = bpe
    closing = np.array([any(c in tok.decode([t]) for c in '"}]') for t in range(vocab)], dtype=np.float32)
    for seed in range(4):
        params = SamplingParams(temperature=temperature, seed=seed, min_tokens=200, top_p=0.95)
        state = SamplingState(params, [], vocab, [eos], Constraint(ll, json_grammar(SCHEMA)))
        mirror = Constraint(ll, json_grammar(SCHEMA))
        other = _state(vocab, eos=(eos,), seed=seed + 100, min_tokens=200)
        assert state.needs_processing and not state.min_tokens_active and other.min_tokens_active
        rng = np.random.default_rng(seed)
        out: list[int] = []
        for _ in range(150):
            logits = rng.standard_normal((2, vocab), dtype=np.float32) * np.float32(2.0) + closing * 4
            logits[:, eos] = 10.0  # the model wants to stop: only the grammar may let it
            allowed = _allowed(mirror, vocab)
            token, other_token = sample(logits, [state, other])
            assert allowed[token], tok.decode(out + [token])
            assert other_token != eos
            if temperature == 0.0:
                assert token == int(np.where(allowed, logits[0], -np.inf).argmax())
            out.append(token)
            state.append(token)
            other.append(other_token)
            mirror.accept(token)
            if state.grammar_finished or token == eos:
                break
        assert state.grammar_finished or out[-1] == eos, tok.decode(out)
        text = tok.decode([t for t in out if t != eos])
        doc = json.loads(text)
        jsonschema.validate(doc, SCHEMA)
        assert text == json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def test_grammar_row_processing_matches_torch(bpe) -> None:
    _tok, vocab, eos, ll = bpe
    kw = {"temperature": 0.0, "repetition_penalty": 1.2, "logit_bias": ((5, 3.0),), "min_tokens": 50}
    ours = SamplingState(SamplingParams(**kw), [5, 6], vocab, [eos], Constraint(ll, json_grammar(SCHEMA)))
    theirs = torch_sampler.SamplingState(SamplingParams(**kw), [5, 6], vocab, [eos],
                                         Constraint(ll, json_grammar(SCHEMA)))
    assert not ours.min_tokens_active  # a grammar decides where the text ends
    for step in range(30):
        row = _logits(1, vocab, seed=step)
        a, = sample(row, [ours])
        b, = torch_sampler.sample(_t(row), [theirs])
        assert a == b
        mine, ref = row[0].copy(), _t(row[0])
        ours._apply(mine)
        theirs._apply(ref)
        np.testing.assert_array_equal(mine, ref.numpy())
        ours.append(a)
        theirs.append(b)
        if ours.grammar_finished:
            break
    assert ours.grammar_finished == theirs.grammar_finished


# --------------------------------------------------------------------------- no torch


def test_importing_and_using_the_lite_sampler_does_not_import_torch(bpe) -> None:
    code = f"""
import sys
import numpy as np
import app.lite.sampler as s
from app.engine.types import SamplingParams
assert "torch" not in sys.modules, "import"
x = np.random.default_rng(0).standard_normal((3, 400), dtype=np.float32)
states = [s.SamplingState(SamplingParams(temperature=t, top_p=p, repetition_penalty=1.1, seed=1),
                          [1, 2], 400, [0])
          for t, p in ((0.0, 1.0), (0.8, 0.9), (1.0, 1.0))]
print(s.sample(x, states), s.logprobs_of(x, [1, 2, 3], [2, 0, 1])[0].token_id)

from tokenizers import Tokenizer
from app.engine.grammar import Constraint, grammar_tokenizer, json_grammar
tok = Tokenizer.from_str({bpe[0].to_str()!r})
row = np.zeros({bpe[1]}, dtype=np.float32)
Constraint(grammar_tokenizer(tok, {bpe[1]}, [0]), json_grammar(None)).mask_(row)
assert np.isinf(row).any() and np.isfinite(row).any()
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
