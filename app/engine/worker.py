"""The engine loop of one model, on its own thread so the HTTP event loop never runs a forward pass.

Each iteration reads like the algorithm:

    1. take new requests and aborts from the inbox (block when there is nothing to do);
    2. schedule: admit waiting sequences while fewer than `max_num_seqs` run;
    3. run one model step for every running sequence (prefill for newcomers, one token for the others);
    4. sample a token per sequence with its own parameters and generator;
    5. postprocess: stop rules, incremental detokenization, emit a Delta per sequence, retire the finished.

A failure inside a step fails the sequences of that step (their clients get the error) and frees their
KV state; the loop itself keeps running, so no request can kill the engine or leak its slot.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass
from typing import Any

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.sampler import SamplingState, sample
from app.engine.sequence import Sequence, SequenceStatus
from app.engine.types import Delta, FinishReason, SamplingParams
from app.models.base import ModelRunner, StepInput

log = logging.getLogger("lanner.engine")

Emit = Callable[[str, "Delta | BaseException"], None]


@dataclass
class NewRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


_STOP = object()


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        eos_token_ids: Seq[int],
        emit: Emit,
        name: str = "engine",
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.emit = emit
        self.name = name
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._by_request: dict[str, Sequence] = {}
        self._seq_ids = itertools.count()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ API side (any thread)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._inbox.put(NewRequest(request_id, list(prompt_ids), params))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name=f"lanner-{self.name}", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------ engine thread

    def run_forever(self) -> None:
        while True:
            if not self._drain_inbox(block=not self.waiting and not self.running):
                break
            if self.waiting or self.running:
                self.step()
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, FinishReason.ABORT)
            self.emit(seq.request_id, Delta("", [], FinishReason.ABORT, seq.num_prompt_tokens,
                                            seq.num_output_tokens))

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds/aborts; returns False when asked to stop."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if isinstance(item, NewRequest):
                self._admit_new(item)
            else:
                self._abort(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _admit_new(self, req: NewRequest) -> None:
        try:
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=req.request_id,
                prompt_ids=req.prompt_ids,
                params=req.params,
                sampling=SamplingState(req.params, req.prompt_ids, self.runner.vocab_size, tuple(self.eos_token_ids)),
                detokenizer=IncrementalDetokenizer(self.tokenizer, req.prompt_ids, stop=req.params.stop),
            )
        except Exception as exc:  # a bad request must not kill the loop
            log.exception("could not create sequence for %s", req.request_id)
            self.emit(req.request_id, exc)
            return
        self._by_request[req.request_id] = seq
        self.waiting.append(seq)

    def _abort(self, request_id: str) -> None:
        seq = self._by_request.get(request_id)
        if seq is None or seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, FinishReason.ABORT)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.runner.free(seq.seq_id)
        self._by_request.pop(seq.request_id, None)

    def schedule(self) -> list[Sequence]:
        while self.waiting and len(self.running) < self.runner.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return list(self.running)

    def step(self) -> None:
        batch = self.schedule()
        inputs = [StepInput(s.seq_id, s.uncomputed_token_ids(), s.num_computed_tokens) for s in batch]
        try:
            logits = self.runner.step(inputs)  # [B, V]
            tokens = sample(logits, [s.sampling for s in batch])
        except Exception as exc:
            log.exception("engine step failed; failing %d sequence(s)", len(batch))
            for seq in batch:
                self.running.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                self.emit(seq.request_id, exc)
            return
        for seq, inp, token in zip(batch, inputs, tokens):
            seq.num_computed_tokens += len(inp.token_ids)
            self._postprocess(seq, token)

    def _postprocess(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        seq.sampling.append(token)
        params = seq.params
        reason: FinishReason | None = None
        text = ""
        min_reached = seq.num_output_tokens >= params.min_tokens
        if min_reached and token in params.stop_token_ids:
            reason = FinishReason.STOP
        elif min_reached and not params.ignore_eos and token in self.eos_token_ids:
            reason = FinishReason.STOP
        else:
            text = seq.detokenizer.step([token])
            if seq.detokenizer.stopped:
                reason = FinishReason.STOP
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.runner.max_model_len:
                reason = FinishReason.LENGTH
        if reason is not None:
            if reason is not FinishReason.STOP or not seq.detokenizer.stopped:
                text += seq.detokenizer.flush()
            self.running.remove(seq)
            self._finish(seq, reason)
        self.emit(seq.request_id, Delta(text, [token], reason, seq.num_prompt_tokens, seq.num_output_tokens))
