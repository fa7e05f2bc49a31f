"""Tests for app.engine.detokenizer.IncrementalDetokenizer on a tiny in-memory byte-level BPE."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from app.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"

WORDS = [
    "hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "server",
    "token", "stream", "café", "naïve", "résumé", "façade", "Ünïcödé", "straße", "crème", "brûlée",
    "日本語", "テキスト", "中文", "测试", "한국어", "Привет", "мир", "Ελληνικά", "😀", "🎉", "👍🏽",
    "🚀", "👨‍👩‍👧", "∑", "→", "½", "END", "STOP", "\n", "###", "  ",
]

SAMPLE_TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "café naïve résumé façade",
    "日本語のテキストです。中文文本测试",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 🚀!",
    "mixed: Привет мир, Ελληνικά, 한국어 → ∑ ½",
    "line one\nline two\n\n  indented",
    "🦄🦓🦒 rare emoji not in the corpus",
    "",
]


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(1234)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(
    tokenizer: PreTrainedTokenizerFast,
    output_ids: Sequence[int],
    prompt_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    skip_special_tokens: bool = True,
    chunk_sizes: Sequence[int] | None = None,
    flush: bool = True,
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed output_ids (one at a time, or in the given chunk sizes); return the chunks released."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=stop, skip_special_tokens=skip_special_tokens)
    chunks: list[str] = []
    i = 0
    sizes = iter(chunk_sizes) if chunk_sizes is not None else None
    while i < len(output_ids):
        n = next(sizes, 1) if sizes is not None else 1
        chunks.append(detok.step(output_ids[i : i + n]))
        i += n
    if flush:
        chunks.append(detok.flush())
    return chunks, detok


def _random_chunking(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while n > 0:
        k = min(n, rng.randint(1, 4))
        sizes.append(k)
        n -= k
    return sizes


def _reference_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Character-by-character semantics: the first stop string completed in the text wins."""
    for end in range(1, len(text) + 1):
        found = [(text.find(s, 0, end), s) for s in stops if s and text.find(s, 0, end) >= 0]
        if found:
            start, stop = min(found)
            return text[:start], stop
    return text, None


# --------------------------------------------------------------------------- fixture sanity


def test_fixture_splits_characters_over_several_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    backend = tokenizer.backend_tokenizer
    ids = _encode(tokenizer, "🦄")
    assert len(ids) > 1  # a 4-byte character spread over several byte-level tokens
    assert REPLACEMENT in backend.decode(ids[:1])
    assert tokenizer.eos_token_id is not None


# --------------------------------------------------------------------------- no stop strings


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_stream_equals_full_decode(tokenizer: PreTrainedTokenizerFast, text: str, with_prompt: bool) -> None:
    prompt = _encode(tokenizer, "Some prompt: café 日本 😀") if with_prompt else []
    ids = _encode(tokenizer, text)
    chunks, detok = _stream(tokenizer, ids, prompt)
    assert "".join(chunks) == text == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.text == text
    assert chunks[-1] == ""  # valid text: nothing left for flush
    for chunk in chunks:
        assert REPLACEMENT not in chunk


def test_multibyte_chars_released_only_when_complete(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "a🦄b"
    ids = _encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [])
    released = [detok.step([t]) for t in ids]
    assert released[0] == "a"
    # the unicorn's bytes come out in one piece, only once its last byte arrived
    assert [r for r in released if r] == ["a", "🦄", "b"]


def test_random_valid_text_streams_without_replacement_chars(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(7)
    for _ in range(150):
        seps = ["", " ", "  ", "\n"]
        text = "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(rng.randint(1, 15)))
        prompt = _encode(tokenizer, rng.choice(SAMPLE_TEXTS))
        ids = _encode(tokenizer, text)
        sizes = _random_chunking(rng, len(ids)) if rng.random() < 0.5 else None
        chunks, detok = _stream(tokenizer, ids, prompt, chunk_sizes=sizes)
        assert "".join(chunks) == text == detok.text
        assert all(REPLACEMENT not in c for c in chunks)


def test_random_token_ids_match_full_decode_after_flush(tokenizer: PreTrainedTokenizerFast) -> None:
    """Arbitrary ids (invalid UTF-8, special tokens): stream + flush == one-shot decode."""
    backend = tokenizer.backend_tokenizer
    vocab = len(tokenizer)
    rng = random.Random(42)
    saw_trailing_replacement = False
    for _ in range(400):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 25))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))] if rng.random() < 0.3 else []
        sizes = _random_chunking(rng, len(ids)) if rng.random() < 0.5 else None
        for skip in (True, False):
            chunks, detok = _stream(tokenizer, ids, prompt, skip_special_tokens=skip, chunk_sizes=sizes)
            expected = backend.decode(ids, skip_special_tokens=skip)
            if not prompt:
                assert "".join(chunks) == expected
                assert expected == tokenizer.decode(ids, skip_special_tokens=skip)
            assert "".join(chunks) == detok.text
            # streamed chunks never end in a replacement char (it might be half a character);
            # only flush may emit one at the very end
            assert all(not c.endswith(REPLACEMENT) for c in chunks[:-1])
            saw_trailing_replacement |= chunks[-1].endswith(REPLACEMENT)
    assert saw_trailing_replacement


def test_flush_emits_replacement_for_incomplete_tail(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _encode(tokenizer, "ok 🦄")
    cut = ids[:-1]  # drop the last byte token of the unicorn
    detok = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detok.step([t]) for t in cut)
    # " " may share a byte-level token with the unicorn's first byte, so it can be held too
    assert streamed in ("ok", "ok ")
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT) and streamed + tail == "ok " + REPLACEMENT
    assert streamed + tail == tokenizer.decode(cut) == detok.text
    assert detok.flush() == ""  # idempotent
    assert detok.step([ids[-1]]) == ""  # finished
    assert not detok.stopped


def test_skip_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    ids = _encode(tokenizer, "before") + [eos] + _encode(tokenizer, " after") + [eos]
    chunks, _ = _stream(tokenizer, ids, skip_special_tokens=True)
    assert "".join(chunks) == "before after"
    chunks, _ = _stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(chunks) == "before<eos> after<eos>"


def test_special_token_inside_multibyte_char_is_skipped(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _encode(tokenizer, "🦄")
    ids = ids[:1] + [tokenizer.eos_token_id] + ids[1:]
    chunks, _ = _stream(tokenizer, ids)
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)


def test_long_output_stays_correct(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(3)
    text = " ".join(rng.choice(WORDS) for _ in range(1500))
    ids = _encode(tokenizer, text)
    assert len(ids) > 600  # crosses the internal window-trimming threshold
    chunks, detok = _stream(tokenizer, ids, stop=["never-present-stop"])
    assert "".join(chunks) == text == detok.text


def test_step_with_no_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], stop=["x"])
    assert detok.step([]) == ""
    assert detok.flush() == ""
    assert detok.text == ""


# --------------------------------------------------------------------------- stop strings


def test_stop_string_split_across_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "hello world STOP and more"
    ids = _encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    out = []
    for t in ids:
        out.append(detok.step([t]))
        if detok.stopped:
            break
    assert "".join(out) == "hello world " == detok.text
    assert detok.stopped and detok.stop_reason == "STOP"
    assert detok.step(_encode(tokenizer, " more")) == ""
    assert detok.flush() == ""
    assert detok.text == "hello world "


def test_hold_back_partial_stop_string(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["END"])
    released = "".join(detok.step([t]) for t in _encode(tokenizer, "fox E"))
    assert released == "fox "  # "E" might become "END"
    released += "".join(detok.step([t]) for t in _encode(tokenizer, "N"))
    assert released == "fox "
    released += "".join(detok.step([t]) for t in _encode(tokenizer, "X"))
    assert released == "fox ENX"  # "ENX" can no longer become "END"
    released += "".join(detok.step([t]) for t in _encode(tokenizer, " EN"))
    assert released == "fox ENX "
    tail = detok.flush()  # finished by length: the held "EN" is released
    assert tail == "EN"
    assert released + tail == detok.text == "fox ENX EN"
    assert not detok.stopped and detok.stop_reason is None


def test_stop_string_with_multibyte_chars(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "foo 🦄🦓 bar"
    chunks, detok = _stream(tokenizer, _encode(tokenizer, text), stop=["🦓"])
    assert "".join(chunks) == "foo 🦄" == detok.text
    assert detok.stop_reason == "🦓"
    assert all(REPLACEMENT not in c for c in chunks)


def test_earliest_stop_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _encode(tokenizer, "one two three four")
    chunks, detok = _stream(tokenizer, ids, stop=["four", "two", "three"])
    assert "".join(chunks) == "one "
    assert detok.stop_reason == "two"
    # all at once: same answer
    detok = IncrementalDetokenizer(tokenizer, [], stop=["four", "two", "three"])
    assert detok.step(ids) == "one "
    assert detok.stop_reason == "two"


@pytest.mark.parametrize("stops", [["ab", "abc"], ["abc", "ab"]])
def test_stop_string_that_is_prefix_of_another(tokenizer: PreTrainedTokenizerFast, stops: list[str]) -> None:
    for chunking in (None, [100]):  # token by token, and everything in one step
        chunks, detok = _stream(tokenizer, _encode(tokenizer, "xx abcd"), stop=stops, chunk_sizes=chunking)
        assert "".join(chunks) == "xx "
        assert detok.stop_reason == "ab"  # completed first


def test_overlapping_stops_first_completed_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    # "bc" is completed (at index 3) before "abcd" (index 4), whatever the token split.
    for chunking in (None, [100]):
        ids = _encode(tokenizer, "xabcdy")
        chunks, detok = _stream(tokenizer, ids, stop=["abcd", "bc"], chunk_sizes=chunking)
        assert "".join(chunks) == "xa"
        assert detok.stop_reason == "bc"


def test_stop_at_very_start(tokenizer: PreTrainedTokenizerFast) -> None:
    chunks, detok = _stream(tokenizer, _encode(tokenizer, "STOP now"), stop=["STOP"])
    assert chunks[-1] == "" and "".join(chunks) == "" and detok.stopped


def test_stop_not_matched_in_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = _encode(tokenizer, "please END")
    chunks, detok = _stream(tokenizer, _encode(tokenizer, " ok"), prompt, stop=["END"])
    assert "".join(chunks) == " ok" and not detok.stopped


def test_random_stop_strings_match_reference(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(99)
    for _ in range(300):
        text = "".join(rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
        stops: list[str] = []
        for _ in range(rng.randint(1, 3)):
            if text and rng.random() < 0.7:  # a substring of the text (so it may match)
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(WORDS) + rng.choice(["", " ", "x"]))
        ids = _encode(tokenizer, text)
        sizes = _random_chunking(rng, len(ids)) if rng.random() < 0.5 else None
        chunks, detok = _stream(tokenizer, ids, stop=stops, chunk_sizes=sizes)
        expected, reason = _reference_stop(text, stops)
        out = "".join(chunks)
        assert out == expected == detok.text, (text, stops)
        assert detok.stop_reason == reason
        assert detok.stopped == (reason is not None)
        assert all(s not in out for s in stops if s)
        assert all(REPLACEMENT not in c for c in chunks)


def test_stop_strings_with_random_token_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    """Stop strings also behave on arbitrary (possibly invalid UTF-8) token sequences."""
    backend = tokenizer.backend_tokenizer
    vocab = len(tokenizer)
    rng = random.Random(5)
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 25))]
        full = backend.decode(ids, skip_special_tokens=True)
        stops = []
        if full:
            i = rng.randrange(len(full))
            stops.append(full[i : i + rng.randint(1, 3)])
        stops.append("zz")
        chunks, detok = _stream(tokenizer, ids, stop=stops)
        expected, reason = _reference_stop(full, stops)
        # a stop string made of (or ending in) U+FFFD may only show up at flush time; skip those
        if REPLACEMENT in "".join(stops):
            continue
        assert "".join(chunks) == expected, (ids, stops)
        assert detok.stop_reason == reason
