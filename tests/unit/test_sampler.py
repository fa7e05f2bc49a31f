"""Tests for app.engine.sampler (all seeded and deterministic)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import app.engine.sampler as sampler_module
from app.engine.sampler import SamplingState, sample
from app.engine.types import SamplingParams

EOS = 2


def _state(
    vocab: int = 50, prompt: tuple[int, ...] = (), eos: tuple[int, ...] = (EOS,), **kw: object
) -> SamplingState:
    return SamplingState(SamplingParams(**kw), list(prompt), vocab, list(eos))


def _logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale


def _run(states: list[SamplingState], steps: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Sample `steps` tokens for every state; row logits depend only on (step, seed)."""
    out: list[list[int]] = [[] for _ in states]
    for step in range(steps):
        row = _logits(1, vocab, seed=seed * 1000 + step)
        picks = sample(row.expand(len(states), vocab).contiguous(), states)
        for i, (s, t) in enumerate(zip(states, picks)):
            s.append(t)
            out[i].append(t)
    return out


# --------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_logits_untouched() -> None:
    logits = _logits(6, 100)
    before = logits.clone()
    states = [_state(100, temperature=0.0) for _ in range(6)]
    assert sample(logits, states) == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)


def test_mixed_batch_greedy_rows_and_caller_tensor_untouched() -> None:
    logits = _logits(4, 100)
    logits[1, :10] = -math.inf
    before = logits.clone()
    states = [
        _state(100, temperature=0.0),
        _state(100, temperature=0.7, top_p=0.9, seed=1),
        _state(100, temperature=0.0, repetition_penalty=1.3, prompt=(5, 6)),
        _state(100, temperature=1.2, top_k=5, min_p=0.1, frequency_penalty=0.5, seed=2),
    ]
    picks = sample(logits, states)
    assert torch.equal(logits, before)
    assert picks[0] == int(logits[0].argmax())
    assert all(0 <= t < 100 for t in picks)
    assert picks[1] >= 10


def test_top_k_one_is_greedy() -> None:
    logits = _logits(5, 200, seed=3)
    states = [_state(200, temperature=1.5, top_k=1, seed=i) for i in range(5)]
    assert states[0].greedy
    assert sample(logits, states) == logits.argmax(-1).tolist()


def test_tiny_top_p_is_greedy() -> None:
    for seed in range(20):
        logits = _logits(3, 500, seed=seed)
        states = [_state(500, temperature=1.0, top_p=1e-6, seed=seed * 10 + i) for i in range(3)]
        assert not states[0].greedy
        assert sample(logits, states) == logits.argmax(-1).tolist()


def test_tiny_temperature_is_greedy_without_overflow() -> None:
    logits = _logits(2, 100) * 1e6
    states = [_state(100, temperature=1e-9, seed=1), _state(100, temperature=1e-9, seed=2)]
    assert sample(logits, states) == logits.argmax(-1).tolist()


# --------------------------------------------------------------------------- seeds


PARAM_SETS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, top_k=20),
    dict(temperature=0.9, top_k=50, top_p=0.8, min_p=0.05),
    dict(temperature=1.0, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1),
]


@pytest.mark.parametrize("vocab", [300, 3000])
def test_same_seed_same_tokens_regardless_of_batch(vocab: int) -> None:
    for params in PARAM_SETS:
        alone = _run([_state(vocab, prompt=(1, 2, 3), seed=1234, **params)], 25, vocab)[0]
        # the same request in the middle of a batch of other seeded requests with other params
        others = [_state(vocab, seed=7 + i, **p) for i, p in enumerate(PARAM_SETS)]
        others.insert(2, _state(vocab, prompt=(1, 2, 3), seed=1234, **params))
        others.insert(0, _state(vocab, temperature=0.0))
        in_batch = _run(others, 25, vocab)[3]
        assert alone == in_batch, params


def test_different_seeds_differ_and_same_seed_repeats() -> None:
    runs = {seed: _run([_state(1000, seed=seed, temperature=1.0)], 30, 1000, seed=5)[0] for seed in (1, 2, 3)}
    assert runs[1] != runs[2] and runs[2] != runs[3] and runs[1] != runs[3]
    assert _run([_state(1000, seed=1, temperature=1.0)], 30, 1000, seed=5)[0] == runs[1]


def test_unseeded_and_extreme_seeds() -> None:
    seeds = [None, -5, 2**64 - 1, 2**70]
    states = [_state(100, seed=seed) for seed in seeds]
    picks = sample(_logits(4, 100), states)
    assert all(0 <= t < 100 for t in picks)


# --------------------------------------------------------------------------- filters


def _draws(logits_row: list[float], n: int, seed: int = 0, **kw) -> list[int]:
    vocab = len(logits_row)
    state = _state(vocab, seed=seed, **kw)
    row = torch.tensor([logits_row], dtype=torch.float32)
    return [sample(row, [state])[0] for _ in range(n)]


def test_temperature_distribution() -> None:
    probs = [0.5, 0.25, 0.15, 0.1]
    logits = [math.log(p) for p in probs]
    n = 4000
    for temp in (1.0, 0.5, 2.0):
        counts = [0] * 4
        for t in _draws(logits, n, seed=11, temperature=temp):
            counts[t] += 1
        expected = torch.softmax(torch.tensor(logits) / temp, dim=0).tolist()
        for c, e in zip(counts, expected):
            assert abs(c / n - e) < 0.03, (temp, counts, expected)


def test_top_k_restricts_support() -> None:
    logits = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]
    seen = set(_draws(logits, 300, seed=1, top_k=3))
    assert seen == {0, 1, 2}


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


def test_single_survivor_no_nan() -> None:
    row = [10.0] + [-math.inf] * 9
    for kw in (dict(), dict(top_p=0.5), dict(top_k=3), dict(min_p=0.9), dict(top_k=5, top_p=0.3, min_p=0.5)):
        assert set(_draws(row, 20, seed=4, **kw)) == {0}
    # everything filtered except the maximum
    row = [0.0, 30.0, 0.0, 0.0]
    assert set(_draws(row, 20, seed=5, min_p=0.5, top_p=0.9)) == {1}


def test_all_neg_inf_row_does_not_crash() -> None:
    logits = torch.full((2, 10), -math.inf)
    picks = sample(logits, [_state(10, seed=1), _state(10, seed=2, top_p=0.5, top_k=3)])
    assert all(0 <= t < 10 for t in picks)


def test_neg_inf_entries_never_sampled() -> None:
    vocab = 2000
    rng = random.Random(0)
    for step in range(10):
        logits = _logits(len(PARAM_SETS), vocab, seed=100 + step)
        banned = torch.tensor(rng.sample(range(vocab), vocab // 2))
        logits[:, banned] = -math.inf
        states = [_state(vocab, seed=step * 10 + i, **p) for i, p in enumerate(PARAM_SETS)]
        for t in sample(logits, states):
            assert math.isfinite(float(logits[0, t]))


def _reference_support(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """Naive full-sort implementation of temperature -> top_k -> top_p -> min_p."""
    x = row / p.temperature
    vals, idx = torch.sort(x, descending=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    if 0 < p.top_k < len(row):
        keep[p.top_k :] = False
    probs = torch.softmax(vals.masked_fill(~keep, -math.inf).double(), dim=0)
    if p.top_p < 1.0:
        before = torch.cumsum(probs, 0) - probs
        keep &= ~(before >= p.top_p)
        keep[0] = True
    if p.min_p > 0:
        keep &= vals >= vals[0] + math.log(p.min_p)
    return set(idx[keep].tolist())


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])  # flat (full-sort fallback) .. peaked (window)
def test_filters_match_reference(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    fallbacks: list[int] = []  # window sizes of the retries with a larger window
    real_candidates = sampler_module._candidates

    def spy(x, params, min_window=sampler_module._TOP_P_WINDOW):  # type: ignore[no-untyped-def]
        if min_window > sampler_module._TOP_P_WINDOW:
            fallbacks.append(min_window)
        return real_candidates(x, params, min_window)

    monkeypatch.setattr(sampler_module, "_candidates", spy)
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
        x = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
        vals, idx = sampler_module._candidates(x.clone(), params)
        for r, p in enumerate(params):
            got = set(idx[r][torch.isfinite(vals[r])].tolist())
            ref = _reference_support(logits[r], p)
            # float32 vs float64 cumsum may disagree on a token sitting exactly at the top_p edge
            assert len(got ^ ref) <= 1, (p, len(got), len(ref))
            assert idx[r][0].item() == int(logits[r].argmax())
    if scale == 0.3:
        assert fallbacks  # flat distributions: the nucleus does not fit in the top-k window
    if scale == 8.0:
        assert not fallbacks


# --------------------------------------------------------------------------- penalties & min_tokens


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    row = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    # token 0 in the prompt: 2.0 / 1.2 = 1.67 < 1.9 -> argmax moves to 1
    assert sample(row, [_state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.2)]) == [1]
    # negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1
    row2 = torch.tensor([[-1.0, -1.1, -5.0, -5.0]])
    assert sample(row2, [_state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.2)]) == [1]
    # output tokens count too
    s = _state(4, temperature=0.0, repetition_penalty=1.2)
    assert sample(row, [s]) == [0]
    s.append(0)
    assert sample(row, [s]) == [1]


def test_presence_and_frequency_penalties_use_output_only() -> None:
    row = torch.tensor([[2.0, 1.9, 0.0, 0.0]])
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
    row = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])  # EOS=2 best, then stop token 3
    s = _state(5, temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    assert sample(row, [s]) == [4]
    s.append(4)
    assert sample(row, [s]) == [4]
    s.append(4)
    assert sample(row, [s]) == [2]  # min_tokens reached


def test_min_tokens_with_sampling_and_ignore_eos_does_not_mask() -> None:
    row = [0.0, 0.0, 20.0, 0.0]
    assert set(_draws(row, 30, seed=9, min_tokens=1000)) <= {0, 1, 3}
    s = _state(4, temperature=0.0, ignore_eos=True)
    assert sample(torch.tensor([row]), [s]) == [2]


def test_min_tokens_multiple_eos_ids() -> None:
    row = torch.tensor([[0.0, 7.0, 9.0, 8.0]])
    s = _state(4, eos=(1, 2), temperature=0.0, min_tokens=1)
    assert sample(row, [s]) == [3]


def test_logit_bias_adds_to_the_listed_logits() -> None:
    row = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert sample(row, [_state(4, temperature=0.0, logit_bias=((0, -1.5),))]) == [1]  # 1.5 < 2.0
    assert sample(row, [_state(4, temperature=0.0, logit_bias=((0, -0.5), (3, 2.6)))]) == [3]  # 2.6 > 2.5
    assert row.tolist() == [[3.0, 2.0, 1.0, 0.0]]  # the caller's logits are untouched
    # -100 bans a token from sampling, +100 makes it all but certain, whatever the filters
    assert 0 not in _draws([3.0, 2.0, 1.0, 0.0], 200, seed=1, logit_bias=((0, -100.0),))
    assert set(_draws([3.0, 2.0, 1.0, 0.0], 50, seed=2, top_p=0.9, logit_bias=((2, 100.0),))) == {2}
    # ids beyond the logits row (checked by the API) are ignored here, never an index error
    assert sample(row, [_state(4, temperature=0.0, logit_bias=((9, 50.0),))]) == [0]


def test_logit_bias_comes_before_penalties() -> None:
    # token 0 in the prompt, repetition penalty 1.1, bias +1.2: bias first gives (1.0 + 1.2) / 1.1 = 2.0,
    # below token 1's 2.05; the penalty first would give 1.0 / 1.1 + 1.2 = 2.11 and pick token 0.
    row = torch.tensor([[1.0, 2.05, 0.0, 0.0]])
    s = _state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.1, logit_bias=((0, 1.2),))
    assert sample(row, [s]) == [1]
    s = _state(4, prompt=(0,), temperature=0.0, repetition_penalty=1.1, logit_bias=((0, 1.3),))
    assert sample(row, [s]) == [0]  # (1.0 + 1.3) / 1.1 = 2.09


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 5), [_state(5)])
    assert sample(torch.zeros(0, 5), []) == []


def test_logprobs_of_small_rows():
    from app.engine.sampler import MIN_LOGPROB, logprobs_of

    logits = torch.tensor([[0.0, math.log(3.0), -math.inf], [2.0, 2.0, 2.0]])
    a, b = logprobs_of(logits, [0, 2], [2, 0])
    assert a.token_id == 0 and a.logprob == pytest.approx(math.log(0.25))
    assert [t for t, _ in a.top] == [1, 0] and a.top[0][1] == pytest.approx(math.log(0.75))
    assert b.logprob == pytest.approx(-math.log(3.0)) and b.top == ()
    c, = logprobs_of(logits[:1], [2], [3])  # impossible token: finite floor, as OpenAI reports it
    assert c.logprob == MIN_LOGPROB and [t for t, _ in c.top] == [1, 0, 2] and c.top[2][1] == MIN_LOGPROB
    with pytest.raises(ValueError):
        logprobs_of(logits, [0], [1])
