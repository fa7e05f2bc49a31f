"""What a request's sampling state holds whatever the array library: app/engine/sampler.py (torch tensors)
and app/lite/sampler.py (numpy arrays, the torch-free worker) subclass it with their own arrays."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.engine.types import SamplingParams

if TYPE_CHECKING:  # app.engine.grammar imports llguidance; a Constraint arrives ready-made
    from app.engine.grammar import Constraint

# Temperatures below this are treated as greedy (dividing by them would overflow fp32).
GREEDY_TEMPERATURE = 1e-5
SEED_MASK = (1 << 64) - 1
# OpenAI reports -9999.0 for tokens the model gives no probability at all (JSON has no -inf).
MIN_LOGPROB = -9999.0


class SamplingStateBase:
    """Per-sequence sampling state, built once when a request is admitted.

    ``vocab_size`` is the width of the logits rows (the model's, possibly padded, vocabulary).  A subclass
    makes the generator (`_generator`), index and value arrays (`_ids`, `_values`), the penalty bookkeeping
    (`_ensure_penalty_arrays`: `_seen`, `_counts`, only when a penalty needs them) and applies it all to a
    row (`_apply`)."""

    __slots__ = (
        "_bias",
        "_bias_ids",
        "_counts",
        "_frequency_penalty",
        "_min_tokens",
        "_min_tokens_ids",
        "_presence_penalty",
        "_prompt_ids",
        "_repetition_penalty",
        "_seen",
        "constraint",
        "generator",
        "greedy",
        "has_penalties",
        "num_output_tokens",
        "params",
        "seed",
        "vocab_size",
    )

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        eos_token_ids: Sequence[int],
        constraint: Constraint | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint  # the grammar of a response_format request
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = self._generator(self.seed & SEED_MASK)
        self.greedy = params.is_greedy or params.temperature < GREEDY_TEMPERATURE
        self.num_output_tokens = 0

        banned_ids = (int(t) for t in (*eos_token_ids, *params.stop_token_ids))
        banned = sorted({t for t in banned_ids if 0 <= t < vocab_size})
        self._min_tokens = params.min_tokens if banned and constraint is None else 0
        self._min_tokens_ids = self._ids(banned) if banned else None  # [n]

        bias = [(int(t), float(b)) for t, b in params.logit_bias if 0 <= t < vocab_size and b != 0.0]
        self._bias_ids = self._ids([t for t, _ in bias]) if bias else None  # [n]
        self._bias = self._values([b for _, b in bias]) if bias else None  # [n]

        self._repetition_penalty = float(params.repetition_penalty)
        self._presence_penalty = float(params.presence_penalty)
        self._frequency_penalty = float(params.frequency_penalty)
        self.has_penalties = (
            self._repetition_penalty != 1.0 or self._presence_penalty != 0.0 or self._frequency_penalty != 0.0
        )
        # Built lazily, at the first sample()/append() of a request that uses penalties.
        self._prompt_ids: Sequence[int] | None = prompt_ids if self._repetition_penalty != 1.0 else None
        self._seen: Any = None  # [V] bool: token in prompt or output
        self._counts: Any = None  # [V] fp32: occurrences in the output

    # -- what a subclass provides ----------------------------------------------------------------

    @staticmethod
    def _generator(seed: int) -> Any:
        raise NotImplementedError

    @staticmethod
    def _ids(ids: list[int]) -> Any:
        raise NotImplementedError

    @staticmethod
    def _values(values: list[float]) -> Any:
        raise NotImplementedError

    def _ensure_penalty_arrays(self) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------

    @property
    def min_tokens_active(self) -> bool:
        return self.num_output_tokens < self._min_tokens

    @property
    def grammar_finished(self) -> bool:
        """The grammar (response_format, tool calls) can take no further token: the text is complete."""
        return self.constraint is not None and self.constraint.finished

    @property
    def needs_processing(self) -> bool:
        """True when the logits row must be modified before greedy/sampling."""
        return (self._bias is not None or self.has_penalties or self.constraint is not None
                or self.num_output_tokens < self._min_tokens)

    def append(self, token_id: int) -> None:
        """Record a generated token (updates penalty bookkeeping, the grammar and the output count)."""
        self.num_output_tokens += 1
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if self.has_penalties and 0 <= token_id < self.vocab_size:
            self._ensure_penalty_arrays()
            if self._seen is not None:
                self._seen[token_id] = True
            if self._counts is not None:
                self._counts[token_id] += 1.0

    def _prompt_seen_ids(self) -> list[int]:
        """The prompt's in-vocabulary ids, for the repetition penalty (read once: the prompt is dropped)."""
        ids = [t for t in self._prompt_ids or () if 0 <= t < self.vocab_size]
        self._prompt_ids = None
        return ids
