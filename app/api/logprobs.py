"""Engine `Logprob`s -> the OpenAI shapes: legacy completions (parallel lists, `echo` puts the prompt's
tokens first) and chat (`logprobs.content`, each token with its UTF-8 bytes and its top alternatives).

Token texts are each token decoded on its own (cached per tokenizer). A token that is only part of a UTF-8
character decodes to U+FFFD; its `bytes` in chat are still the real bytes, recovered from the byte-level
alphabet (GPT-2 style BPE) or from a `<0xNN>` byte-fallback piece (SentencePiece style).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

from app.engine.types import Logprob

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable-character table, inverted (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()


class TokenStrings:
    """Text and UTF-8 bytes of single tokens of one tokenizer, cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())

    def text(self, token_id: int) -> str:
        found = self._text.get(token_id)
        if found is None:
            found = self._text[token_id] = self.tokenizer.decode([token_id])
        return found

    def bytes(self, token_id: int) -> list[int]:
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = list(self._raw_bytes(token_id))
        return found

    def _raw_bytes(self, token_id: int) -> bytes:
        text = self.text(token_id)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if m := _BYTE_FALLBACK.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
            if piece and all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
        return text.encode("utf-8")


_strings: weakref.WeakKeyDictionary[Any, TokenStrings] = weakref.WeakKeyDictionary()


def token_strings(tokenizer: Any) -> TokenStrings:
    found = _strings.get(tokenizer)
    if found is None:
        found = _strings[tokenizer] = TokenStrings(tokenizer)
    return found


def prompt_entries(prompt_ids: Sequence[int], scored: Sequence[Logprob] | None) -> list[tuple[int, Logprob | None]]:
    """(token id, logprob) of every prompt token; the first has none (nothing precedes it)."""
    scored = list(scored or ())
    return [(t, None if i == 0 or i - 1 >= len(scored) else scored[i - 1]) for i, t in enumerate(prompt_ids)]


def completion_piece(text: str, logprobs: Sequence[Logprob] | None, *, echo: str | None = None,
                     prompt_ids: Sequence[int] = (), prompt_logprobs: Sequence[Logprob] | None = None,
                     with_logprobs: bool = False) -> tuple[str, list[tuple[int, Logprob | None]]]:
    """A completion choice's text and logprob entries for some generated tokens; `echo` (the prompt's
    text) goes first, with the prompt tokens' entries when `with_logprobs`."""
    entries: list[tuple[int, Logprob | None]] = [(lp.token_id, lp) for lp in logprobs or ()]
    if echo is not None:
        text = echo + text
        if with_logprobs:
            entries = prompt_entries(prompt_ids, prompt_logprobs) + entries
    return text, entries


def completion_logprobs(strings: TokenStrings, entries: Sequence[tuple[int, Logprob | None]],
                        offset: int = 0, text: str | None = None) -> tuple[dict[str, list], int]:
    """Legacy completions `logprobs` for `entries`, and the offset after them.  Text offsets count from
    `offset` (the length of the choice's text before `text`, the piece these entries belong to) and point
    into the choice's text: a special token that the text leaves out (a BOS the tokenizer added to a text
    prompt, which `echo` returns as sent) takes no characters."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    start = offset
    for token_id, lp in entries:
        token_text = strings.text(token_id)
        out["tokens"].append(token_text)
        out["text_offset"].append(offset)
        skipped = (token_id in strings.special_ids and text is not None
                   and not text.startswith(token_text, offset - start))
        offset += 0 if skipped else len(token_text)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lp.logprob)
        top = {strings.text(t): v for t, v in lp.top}
        top.setdefault(token_text, lp.logprob)
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(strings: TokenStrings, logprobs: Sequence[Logprob]) -> list[dict[str, Any]]:
    """Chat `logprobs.content` entries for sampled tokens."""
    return [{"token": strings.text(lp.token_id), "logprob": lp.logprob, "bytes": strings.bytes(lp.token_id),
             "top_logprobs": [{"token": strings.text(t), "logprob": v, "bytes": strings.bytes(t)} for t, v in lp.top]}
            for lp in logprobs]
