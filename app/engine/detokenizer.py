"""Incremental, UTF-8 safe detokenization with stop strings.

Token -> text (the vLLM/TGI "prefix/read offset" algorithm)
    ``ids`` is the token list, seeded with the last few prompt tokens so that the first generated
    token is decoded *in context* (SentencePiece decoders strip the leading space of a sequence's
    first word, byte-level BPE may need neighbours to form a character).  Two offsets index it:
    ``prefix_offset`` (start of the context window) and ``read_offset`` (end of what was already
    turned into text).  For every new token::

        prefix_text = decode(ids[prefix_offset:read_offset])
        new_text    = decode(ids[prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\\ufffd"):
            emit new_text[len(prefix_text):]; prefix_offset, read_offset = read_offset, len(ids)
        else:
            emit nothing yet (an incomplete UTF-8 sequence, or a token that decodes to nothing)

    Decoding goes through the underlying Rust ``tokenizers.Tokenizer``
    (``PreTrainedTokenizerFast.backend_tokenizer``), which does no ``clean_up_tokenization_spaces``.
    Only ever the small window ``ids[prefix_offset:]`` is decoded, so a step costs O(1) in the
    length of the output.

Stop strings (hold-back)
    Decoded text first goes to ``pending`` (decoded, not yet released).  After each token the
    pending text is searched for stop strings; if one occurs, everything from its first occurrence
    on is dropped, ``stopped``/``stop_reason`` are set and the rest is released.  Otherwise the
    longest suffix of the text that is a proper prefix of some stop string is held back (it may
    still become a stop string) and everything before it is released.

    Because of the hold-back, a stop string can never start inside already released text, so only
    ``pending`` (< max_stop_len chars of held text + the newly decoded text) is ever searched: the
    cost does not grow with the output.

    When stop strings overlap, the winner is the occurrence that is *completed first* in the text
    (smallest end index; ties -> earliest start).  That is exactly what a character-by-character
    stream would see, so the result does not depend on how the text was split into tokens.  For
    non-overlapping candidates this is simply the earliest occurrence.

Finish without a stop string (``flush``)
    Returns the held-back text plus whatever tokens were still waiting for the rest of a UTF-8
    sequence, decoded *with* the replacement character U+FFFD (as vLLM does).  Hence, for any
    token sequence without stop strings,
    ``"".join(step(...) for ...) + flush() == backend.decode(output_ids, skip_special_tokens=...)``
    (when the prompt context does not change the decoding of the first token, e.g. byte-level BPE),
    and a U+FFFD can only appear in a streamed chunk when the token sequence really is invalid
    UTF-8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Prompt tokens used as decoding context for the first generated token (vLLM uses 5).
_PROMPT_CONTEXT_TOKENS = 5
# Drop consumed token ids from the front of the window once this many have accumulated.
_TRIM_THRESHOLD = 256
_REPLACEMENT_CHAR = "\ufffd"


def _make_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """Return ``decode(ids) -> str`` using the fastest available path of ``tokenizer``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "decode_batch"):  # already a tokenizers.Tokenizer
        backend = tokenizer
    if backend is not None:
        decode = backend.decode

        def _decode(ids: list[int]) -> str:
            return decode(ids, skip_special_tokens=skip_special_tokens)

        return _decode

    # Slow (pure Python) tokenizer: same semantics through the transformers API.
    def _decode_slow(ids: list[int]) -> str:
        return tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    return _decode_slow


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text chunks that are safe to send to a client.

    ``tokenizer``: a ``transformers.PreTrainedTokenizerFast`` (or a raw ``tokenizers.Tokenizer``).
    ``prompt_ids``: the prompt; only its last few ids are kept, as decoding context.
    ``stop``: stop strings (empty strings are ignored).  Matching is on the generated text only.
    """

    __slots__ = (
        "_decode",
        "_ids",
        "_prefix_offset",
        "_read_offset",
        "_prefix_text",
        "_stops",
        "_max_stop_len",
        "_stop_prefixes",
        "_pending",
        "_released",
        "_flushed",
        "stopped",
        "stop_reason",
    )

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = _make_decoder(tokenizer, skip_special_tokens)
        context = [int(t) for t in prompt_ids[max(0, len(prompt_ids) - _PROMPT_CONTEXT_TOKENS) :]]
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached while offsets hold

        # dict.fromkeys: drop duplicates and empty strings, keep the caller's order.
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # Every proper, non-empty prefix of a stop string: the candidates for hold-back.
        self._stop_prefixes: frozenset[str] = frozenset(
            s[:i] for s in self._stops for i in range(1, len(s))
        )

        self._pending = ""  # decoded but not released (held back for stop-string matching)
        self._released: list[str] = []  # chunks returned so far
        self._flushed = False
        self.stopped = False
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ public API

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of every ``step``/``flush`` return)."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Append generated token ids; return the text that can now be released (maybe "")."""
        if self.stopped or self._flushed:
            return ""
        decoded = []
        for token_id in new_token_ids:
            self._ids.append(int(token_id))
            piece = self._decode_new_token()
            if piece:
                decoded.append(piece)
        if not decoded:
            return ""
        return self._release("".join(decoded), final=False)

    def flush(self) -> str:
        """At a non-stop finish (length/EOS): release everything held back, see module docstring.

        Returns "" after a stop string matched, and on every call after the first.
        """
        if self.stopped or self._flushed:
            return ""
        self._flushed = True
        tail = ""
        if len(self._ids) > self._read_offset:
            # Tokens still waiting for the rest of a character: decode them lossily (U+FFFD).
            prefix_text = self._get_prefix_text()
            new_text = self._decode(self._ids[self._prefix_offset :])
            if len(new_text) > len(prefix_text):
                tail = new_text[len(prefix_text) :]
        return self._release(tail, final=True)

    # ------------------------------------------------------------------ internals

    def _get_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._prefix_text

    def _decode_new_token(self) -> str:
        """Offset algorithm for the token just appended to ``_ids``; returns the new text or ""."""
        prefix_text = self._get_prefix_text()
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        piece = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        if self._prefix_offset >= _TRIM_THRESHOLD:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return piece

    def _release(self, new_text: str, final: bool) -> str:
        """Add decoded text to ``_pending``; apply stop strings and hold-back; return the release."""
        pending = self._pending + new_text
        if self._stops and pending:
            best_end = -1
            best_start = -1
            best_stop: str | None = None
            for s in self._stops:
                i = pending.find(s)
                if i < 0:
                    continue
                end = i + len(s)
                if best_stop is None or end < best_end or (end == best_end and i < best_start):
                    best_end, best_start, best_stop = end, i, s
            if best_stop is not None:
                self.stopped = True
                self.stop_reason = best_stop
                self._pending = ""
                return self._emit(pending[:best_start])
        if final or not self._stop_prefixes:
            self._pending = ""
            return self._emit(pending)
        hold = 0
        for k in range(min(self._max_stop_len - 1, len(pending)), 0, -1):
            if pending[-k:] in self._stop_prefixes:
                hold = k
                break
        if hold:
            self._pending = pending[-hold:]
            return self._emit(pending[:-hold])
        self._pending = ""
        return self._emit(pending)

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._released.append(chunk)
        return chunk
