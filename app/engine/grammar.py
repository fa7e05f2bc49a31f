"""Structured output: `response_format` JSON grammars, enforced token by token with llguidance.

A request's `response_format` (`json_object`, or `json_schema` with a schema) is compiled to an llguidance
grammar in the API process (`json_grammar`), where a bad schema is a 400 before anything is queued. The
grammar text travels to the worker in `SamplingParams.grammar`. There each such sequence gets a
`Constraint`: before every draw, the logits of tokens the grammar does not allow next become -inf
(llguidance computes the allowed set from the tokenizer's vocabulary in ~10-100 us); the drawn token is
then fed to the matcher. EOS is allowed only where the document may end, and the sequence finishes when
the grammar can take no further token (a closed top-level object), so the text parses as JSON and follows
the schema unless `max_tokens` cuts it short (finish_reason "length"), as in vLLM.

JSON is generated compact (no optional whitespace): a model may otherwise spend its tokens on blank space
inside an object, a known failure of flexible-whitespace JSON grammars.

This module imports neither torch nor transformers at import time (the API process uses `json_grammar`).
"""

from __future__ import annotations

from typing import Any

from llguidance import LLMatcher, LLTokenizer

# `x-guidance` options of every schema: compact separators, no free whitespace.
_JSON_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """The schema cannot be compiled or enforced (the message says why)."""


def _validated(compile_grammar: Any, text: Any) -> str:
    try:
        grammar = compile_grammar(text)
    except Exception as exc:  # llguidance raises plain ValueError/RuntimeError with the reason
        raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"the JSON schema cannot be used: {error}")
    return grammar


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The llguidance grammar of JSON documents that follow `schema` (None: any JSON object)."""
    return _validated(lambda s: LLMatcher.grammar_from_json_schema(s, defaults=_JSON_OPTIONS),
                      ANY_JSON_OBJECT if schema is None else schema)


def lark_grammar(lark: str) -> str:
    """The llguidance grammar of a Lark grammar (JSON schemas inside it with %json, see `json_options`)."""
    return _validated(LLMatcher.grammar_from_lark, lark)


def json_options(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with Lanner's JSON options set (for a schema embedded in a Lark grammar with %json)."""
    return {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> LLTokenizer:
    """llguidance's view of a worker's tokenizer: a `tokenizers.Tokenizer` or a transformers fast tokenizer.
    `vocab_size` is the width of the logits rows (it may exceed the tokenizer's own vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise GrammarError("response_format needs a fast (Rust `tokenizers`) tokenizer; this model has a slow one")
    size = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
    return LLTokenizer(backend.to_str(), n_vocab=size, eos_token=list(eos_token_ids) or None)


class Constraint:
    """One sequence's grammar state: masks logits rows and follows the drawn tokens."""

    __slots__ = ("_matcher",)

    def __init__(self, tokenizer: LLTokenizer, grammar: str) -> None:
        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    @property
    def finished(self) -> bool:
        """No token can follow: the document is complete (or the grammar took EOS)."""
        return self._matcher.is_stopped()

    def mask_(self, row: Any) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place.
        row: [V] fp32, a torch tensor or a numpy array (a numpy row does not import torch)."""
        import numpy as np

        vocab = row.shape[0]
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, count=vocab, bitorder="little")  # bit t of the mask: token t
        if isinstance(row, np.ndarray):
            row[allowed == 0] = -np.inf
            return
        import torch

        row.masked_fill_(torch.from_numpy(allowed == 0), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} breaks the grammar: {self._matcher.get_error()}")

