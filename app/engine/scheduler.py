"""Iteration-level scheduling with chunked prefill.

Every engine step gets a token budget (`max_num_batched_tokens`). The scheduler spends it in this order:

    1. one token for every running sequence that is decoding — running streams never stall;
    2. the next chunk of prompts that are part-way through prefill (oldest first);
    3. new sequences from the waiting queue, while a KV slot is free (`can_allocate`) and budget remains;
       each gets a first chunk of its prompt (after the part of it `on_admit` found cached).

A long prompt is thus prefilled over several steps while the other streams keep receiving one token per
step. A sequence whose prompt is not complete after its chunk produces no sample that step. Sequences wait
(never fail) when KV space runs out; a finished or aborted sequence frees its slot for the next step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from app.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when after this chunk the sequence has a next token to sample."""
        return self.seq.num_computed_tokens + self.num_tokens >= self.seq.num_prompt_tokens


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int,
                 can_allocate: Callable[[Sequence], bool] | None = None,
                 on_admit: Callable[[Sequence], None] | None = None,
                 hold: Callable[[Sequence], bool] | None = None) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode token each)")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._can_allocate = can_allocate or (lambda seq: True)
        # called as a sequence starts running, before its first chunk is cut: it may mark part of the
        # prompt as already computed (a cached prefix)
        self._on_admit = on_admit or (lambda seq: None)
        # true while a waiting sequence should stay queued (a running one is still computing a prefix it
        # will then copy); the sequences behind it are admitted meanwhile
        self._hold = hold or (lambda seq: False)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted)."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_allocate(self, seq: Sequence) -> bool:
        return len(self.running) < self.max_num_seqs and self._can_allocate(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        for seq in self.running:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                decodes.append(ScheduledChunk(seq, 1))
        budget -= len(decodes)
        for seq in self.running:
            if budget <= 0:
                break
            remaining = seq.num_prompt_tokens - seq.num_computed_tokens
            if remaining > 0:
                n = min(remaining, budget)
                prefills.append(ScheduledChunk(seq, n))
                budget -= n
        # A held sequence keeps its place and a slot for when it is released; sequences behind it may go
        # first into the slots left over.
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) + i < self.max_num_seqs:
            seq = self.waiting[i]
            if not self._can_allocate(seq):
                break
            if self._hold(seq):
                i += 1
                continue
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._on_admit(seq)
            n = min(seq.num_prompt_tokens - seq.num_computed_tokens, budget)
            prefills.append(ScheduledChunk(seq, n))
            budget -= n
        return decodes + prefills
