"""The interface between the engine loop and a model: one forward step over a batch of sequences.

A sequence is fed the tokens not yet in its KV cache (a prompt chunk, or the last sampled token) and the
runner returns the logits of each sequence's last fed position, or of every fed position for an input
marked `all_logits` (prompt log-probabilities). KV state is keyed by `seq_id` and lives
inside the runner until `free(seq_id)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class StepInput:
    seq_id: int
    token_ids: list[int]  # tokens to feed now
    start_pos: int  # tokens of this sequence already in the KV cache
    all_logits: bool = False  # logits of every fed position, not just the last

    @property
    def num_logit_rows(self) -> int:
        return len(self.token_ids) if self.all_logits else 1


class ModelRunner(Protocol):
    vocab_size: int
    max_model_len: int
    max_num_seqs: int

    def step(self, inputs: list[StepInput]) -> Any:
        """Run one forward for the batch; returns fp32 logits (a torch tensor, or a numpy array from the
        torch-free runner, app/lite/runner.py), `num_logit_rows` rows per input in input order (so [B, V] of
        each input's last token when no input asks for all its logits)."""
        ...

    def free(self, seq_id: int) -> None:
        """Release the KV state of a finished or aborted sequence."""
        ...

