"""Per-sequence state. Only the engine loop mutates it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.engine.types import FinishReason, Logprob, SamplingParams

if TYPE_CHECKING:
    from app.engine.detokenizer import IncrementalDetokenizer
    from app.engine.sampler import SamplingState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens already in the KV cache
    num_cached_tokens: int = 0  # prompt tokens found in the KV cache at admission (a reused prefix)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # filled chunk by chunk (echo + logprobs)
    # engine-side timestamps (time.monotonic) for metrics
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def uncomputed_token_ids(self) -> list[int]:
        """Tokens to feed the model next: the rest of the prompt, or the last sampled token."""
        if self.num_computed_tokens < len(self.prompt_ids):
            return self.prompt_ids[self.num_computed_tokens:]
        return self.output_ids[self.num_computed_tokens - len(self.prompt_ids):]
