"""Tests for app.lite.sampler, the numpy port of app.engine.sampler, on what only it promises or must share
with the torch sampler (all seeded and deterministic).

The behaviour both samplers have (greedy, penalties, logit_bias, min_tokens, filters, seeds, statistics,
logprobs) is tested once for both in tests/unit/test_sampler.py.  Here: the numpy sampler's own properties
(its PCG64 stream with one uniform per sampled row, rows computed one at a time so that their order does not
matter, ties by lowest id, the grammar mask on numpy rows, no torch import) and, where the two samplers must
agree (greedy runs, processed logits, the support of the filters, logprobs), comparisons with the torch
sampler on the same logits."""

from __future__ import annotations

import itertools
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
from tests.unit.test_sampler import EOS, NUMPY, PARAM_SETS, TORCH, _draws, _logits, _mixed_batch, _run

REPO = Path(__file__).resolve().parents[2]

_state = NUMPY.state  # a numpy SamplingState: _state(vocab, prompt, eos, **SamplingParams)
_torch_state = TORCH.state
_t = TORCH.array  # a torch copy of a numpy array: the torch side cannot touch it


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


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("vocab", [300, 3000])
def test_seeded_rows_identical_in_any_row_order(vocab: int) -> None:
    """Rows are filtered and drawn one at a time: the same batch in reverse order gives every row the same
    tokens, bit for bit (the torch sampler shares a candidate window between rows)."""
    for params in PARAM_SETS:
        in_order = _run(NUMPY, _mixed_batch(NUMPY, vocab, params), 25, vocab)
        assert _run(NUMPY, _mixed_batch(NUMPY, vocab, params)[::-1], 25, vocab)[::-1] == in_order, params


# --------------------------------------------------------------------------- filters


def test_top_k_ties_keep_the_lowest_ids() -> None:
    logits = [1.0, 5.0, 5.0, 0.0, 5.0, 5.0]
    assert set(_draws(NUMPY, logits, 200, seed=6, top_k=3)) == {1, 2, 4}


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])  # flat (window growth) .. peaked (the window suffices)
def test_filter_support_identical_to_torch(scale: float) -> None:
    """top_k -> top_p -> min_p keep the tokens torch's filters keep, for every combination of the filters
    (numpy one row at a time, torch all rows in one call)."""
    vocab = 4000
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in itertools.product((0.5, 1.5), (0, 5, 100, 2000), (1.0, 0.5, 0.9, 0.99), (0.0, 0.05))
              if k or p < 1.0]
    logits = _logits(len(params), vocab, seed=int(scale * 10), scale=scale)
    x = logits / np.array([p.temperature for p in params], dtype=np.float32)[:, None]
    t_vals, t_idx = torch_sampler._candidates(_t(x), params)
    for r, p in enumerate(params):
        vals, idx = lite._candidates(x[r].copy(), p)
        assert set(idx[np.isfinite(vals)].tolist()) == set(t_idx[r][torch.isfinite(t_vals[r])].tolist()), p


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
    # more alternatives than tokens: the whole row, ties by id
    whole, = logprobs_of(np.full((1, 3), 2.0, dtype=np.float32), [1], [5])
    assert [t for t, _ in whole.top] == [0, 1, 2]


def test_logprobs_of_target_out_of_range_is_an_index_error() -> None:
    with pytest.raises(IndexError):
        logprobs_of(np.zeros((1, 3), dtype=np.float32), [3], [1])
    with pytest.raises(IndexError):
        logprobs_of(np.zeros((1, 3), dtype=np.float32), [-1], [1])


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
