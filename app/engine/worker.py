"""The engine loop of one model. It runs in a worker process pinned to the model's cores
(`app.engine.process`), or on a thread for tests; the HTTP event loop never runs a forward pass.

Each iteration reads like the algorithm:

    1. apply new requests and aborts from the inbox (block when there is nothing to do);
    2. schedule: spend the step's token budget on decodes, prompt chunks and newcomers;
    3. run one model step for the whole batch;
    4. sample a token for every sequence whose prompt is complete, each with its own parameters/generator
       (and score it, and for echo its prompt tokens, when the request asked for logprobs);
    5. postprocess: stop rules, incremental detokenization, one Delta per sequence; retire the finished;
       hand all of the step's Deltas to `emit_batch` at once, with the step's `StepStats` (plain data that
       the API process turns into metrics).

A failure inside a step fails the sequences of that step (their clients get the error) and frees their KV
slots; the loop keeps running, so no request can kill the engine or leak its slot.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence as Seq
from typing import Any

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.grammar import Constraint, GrammarError, grammar_tokenizer
from app.engine.scheduler import Scheduler
from app.engine.sequence import Sequence
from app.engine.types import (
    Abort,
    Delta,
    FinishedStats,
    FinishReason,
    Logprob,
    NewRequest,
    SamplingParams,
    StepStats,
    Stop,
)
from app.models.base import ModelRunner, StepInput

log = logging.getLogger("lanner.engine")

# One step's outputs: (request_id, Delta) or (request_id, error message).
Output = tuple[str, "Delta | str"]
EmitBatch = Callable[[list[Output], StepStats], None]


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        eos_token_ids: Seq[int],
        emit_batch: EmitBatch,
        max_num_batched_tokens: int = 512,
        on_idle: Callable[[], None] | None = None,
        idle_after_s: float = 1.0,
        prefix_caching: bool = True,
    ) -> None:
        self.runner = runner
        # sampling for the runner's logits: torch tensors (app/engine/sampler.py), or numpy arrays from the
        # torch-free runner, whose SAMPLER names app/lite/sampler.py (this process then never imports torch)
        self._sampling = importlib.import_module(getattr(runner, "SAMPLER", "app.engine.sampler"))
        # called once when the engine has had nothing to do for `idle_after_s` after some work (the worker
        # process gives the allocator's free pages back to the OS there)
        self.on_idle, self.idle_after_s = on_idle, idle_after_s
        self._worked_since_idle = False
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._grammar_tokenizer = None  # llguidance's view of `tokenizer`, built for the first grammar
        self.emit_batch = emit_batch
        # a runner that keeps freed slots' keys and values (BatchedRunner.adopt) lets a new prompt continue
        # from the longest prefix a free slot already holds
        self._adopt = getattr(runner, "adopt", None) if prefix_caching else None
        if not prefix_caching and hasattr(runner, "keep_prefixes"):
            runner.keep_prefixes = False  # new sequences fill the lowest slots: least resident memory
        self.scheduler = Scheduler(runner.max_num_seqs, max(max_num_batched_tokens, runner.max_num_seqs),
                                   on_admit=self._reuse_prefix, hold=self._prefix_in_progress)
        self.inbox: queue.SimpleQueue[NewRequest | Abort | Stop] = queue.SimpleQueue()
        self._by_request: dict[str, Sequence] = {}
        self._seq_ids = itertools.count()
        self._outputs: list[Output] = []
        self._finished: list[FinishedStats] = []

    @property
    def num_unfinished(self) -> int:
        return len(self._by_request)

    def run_forever(self) -> None:
        while self._drain_inbox(block=not self.scheduler.has_work):
            if self.scheduler.has_work:
                self.step()
                self._worked_since_idle = True
        for seq in list(self._by_request.values()):
            self._finish(seq, FinishReason.ABORT)
            self._outputs.append((seq.request_id, Delta("", [], FinishReason.ABORT, seq.num_prompt_tokens,
                                                        seq.num_output_tokens)))
        self._flush()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds/aborts; returns False when asked to stop."""
        try:
            idle_due = block and self.on_idle is not None and self._worked_since_idle
            item = self.inbox.get(block=block, timeout=self.idle_after_s if idle_due else None)
        except queue.Empty:
            if block:  # idle for idle_after_s after some work
                self._worked_since_idle = False
                self._run_on_idle()
            return True
        while True:
            if isinstance(item, Stop):
                return False
            if isinstance(item, NewRequest):
                self._add(item)
            else:
                seq = self._by_request.get(item.request_id)
                if seq is not None:
                    self._finish(seq, FinishReason.ABORT)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                self._flush()
                return True

    def _run_on_idle(self) -> None:
        try:
            self.on_idle()  # type: ignore[misc]
        except Exception:  # housekeeping must not stop the loop
            log.exception("on_idle failed")

    def _add(self, req: NewRequest) -> None:
        try:
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=req.request_id,
                prompt_ids=req.prompt_ids,
                params=req.params,
                sampling=self._sampling.SamplingState(req.params, req.prompt_ids, self.runner.vocab_size,
                                       tuple(self.eos_token_ids), self._constraint(req.params)),
                detokenizer=IncrementalDetokenizer(self.tokenizer, req.prompt_ids, stop=req.params.stop),
            )
        except Exception as exc:  # a bad request must not kill the loop
            log.exception("could not create sequence for %s", req.request_id)
            self._outputs.append((req.request_id, f"{type(exc).__name__}: {exc}"))
            return
        seq.arrival_time = time.monotonic()
        self._by_request[req.request_id] = seq
        self.scheduler.add(seq)

    def _reuse_prefix(self, seq: Sequence) -> None:
        # prompt logprobs need every prompt position's logits: such a request prefills all of it
        if self._adopt is not None and seq.params.prompt_logprobs is None:
            try:
                seq.num_cached_tokens = seq.num_computed_tokens = self._adopt(seq.seq_id, seq.prompt_ids)
            except Exception:  # an optimisation: the sequence then prefills in full
                log.exception("prefix reuse failed for %s", seq.request_id)

    def _prefix_in_progress(self, seq: Sequence) -> bool:
        """A running sequence is still prefilling a prefix it shares with `seq` (the n choices of one
        prompt, requests with one system prompt arriving together): `seq` waits for it and copies it
        (BatchedRunner.adopt) instead of computing it a second time."""
        if self._adopt is None or seq.params.prompt_logprobs is not None:
            return False
        min_shared = getattr(self.runner, "COPY_MIN_TOKENS", 32)
        for other in self.scheduler.running:
            if other.num_computed_tokens < other.num_prompt_tokens:
                # held iff they share more than `other` has computed, and at least min_shared tokens
                n = max(min_shared, other.num_computed_tokens + 1)
                if n <= min(other.num_prompt_tokens, seq.num_prompt_tokens - 1) and \
                        other.prompt_ids[:n] == seq.prompt_ids[:n]:  # list equality runs in C
                    return True
        return False

    def _constraint(self, params: SamplingParams) -> Constraint | None:
        if params.grammar is None:
            return None
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.runner.vocab_size,
                                                        sorted(self.eos_token_ids))
        return Constraint(self._grammar_tokenizer, params.grammar)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.remove(seq)
        seq.finish_reason = reason
        self.runner.free(seq.seq_id)
        self._by_request.pop(seq.request_id, None)
        now = time.monotonic()
        first, tok0, last = seq.first_scheduled_time, seq.first_token_time, seq.last_token_time
        self._finished.append(FinishedStats(
            reason, seq.num_prompt_tokens, seq.num_output_tokens,
            queue_s=(first if first is not None else now) - seq.arrival_time,
            prefill_s=tok0 - first if tok0 is not None and first is not None else None,
            decode_s=last - tok0 if last is not None and tok0 is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
        ))

    def _stats(self, **step: Any) -> StepStats:
        kv_usage = getattr(self.runner, "kv_usage", None)
        if kv_usage is None:  # runners without a slot cache: running sequences over capacity
            kv_usage = len(self.scheduler.running) / max(1, self.runner.max_num_seqs)
        stats = StepStats(len(self.scheduler.running), len(self.scheduler.waiting), float(kv_usage),
                          finished=self._finished, **step)
        self._finished = []
        return stats

    def _flush(self, stats: StepStats | None = None) -> None:
        """Hand this round's outputs and stats to the API side (after every step and every inbox drain,
        so the gauges follow adds and aborts even while no step runs)."""
        out, self._outputs = self._outputs, []
        self.emit_batch(out, stats if stats is not None else self._stats())

    def step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            return
        t0 = time.monotonic()
        num_prompt = 0
        for c in chunks:
            if c.seq.first_scheduled_time is None:
                c.seq.first_scheduled_time = t0
            if c.seq.num_computed_tokens < c.seq.num_prompt_tokens:
                num_prompt += c.num_tokens
        inputs = [StepInput(c.seq.seq_id, c.seq.uncomputed_token_ids()[: c.num_tokens], c.seq.num_computed_tokens,
                            all_logits=c.seq.params.prompt_logprobs is not None
                            and c.seq.num_computed_tokens < c.seq.num_prompt_tokens)
                  for c in chunks]
        ready = [i for i, c in enumerate(chunks) if c.completes_prompt]
        try:
            logits = self.runner.step(inputs)  # rows per input: 1, or all fed positions (prompt logprobs)
            if any(inp.all_logits for inp in inputs):
                self._prompt_logprobs(chunks, inputs, logits)
                ends = list(itertools.accumulate(inp.num_logit_rows for inp in inputs))
                logits = logits[[e - 1 for e in ends]]  # [B, V]: each input's last position
            ready_logits = logits[ready] if len(ready) < len(chunks) else logits
            states = [chunks[i].seq.sampling for i in ready]
            tokens = self._sampling.sample(ready_logits, states) if ready else []
            logprobs = self._logprobs(ready_logits, [chunks[i].seq for i in ready], tokens)
        except Exception as exc:
            log.exception("engine step failed; failing %d sequence(s)", len(chunks))
            for c in chunks:
                self._finish(c.seq, FinishReason.ABORT)
                self._outputs.append((c.seq.request_id, f"{type(exc).__name__}: {exc}"))
            self._flush()
            return
        for c in chunks:
            c.seq.num_computed_tokens += c.num_tokens
        now = time.monotonic()
        itl = []
        for j, (i, token) in enumerate(zip(ready, tokens)):
            seq = chunks[i].seq
            if seq.first_token_time is None:
                seq.first_token_time = now
            else:
                itl.append(now - seq.last_token_time)
            seq.last_token_time = now
            self._postprocess(seq, token, logprobs.get(j))
        self._flush(self._stats(
            batch_size=len(chunks), num_batched_tokens=sum(c.num_tokens for c in chunks),
            num_prompt_tokens=num_prompt, num_generation_tokens=len(tokens),
            step_s=time.monotonic() - t0, inter_token_s=itl))

    def _logprobs(self, logits: Any, seqs: list[Sequence], tokens: list[int]) -> dict[int, Logprob]:
        """Logprob of each sampled token whose request asked for them, by position in `seqs`."""
        rows = [j for j, seq in enumerate(seqs) if seq.params.logprobs is not None]
        if not rows:
            return {}
        found = self._sampling.logprobs_of(logits[rows], [tokens[j] for j in rows], [seqs[j].params.logprobs for j in rows])
        return dict(zip(rows, found))

    def _prompt_logprobs(self, chunks: list, inputs: list[StepInput], logits: Any) -> None:
        """Score the prompt tokens that the all-logits rows of this step predict (a row at position p
        predicts token p + 1; the prompt's last position predicts the first sampled token instead)."""
        start = 0
        for c, inp in zip(chunks, inputs):
            n_rows = inp.num_logit_rows
            if inp.all_logits:
                seq = c.seq
                first = inp.start_pos  # position of the first row
                targets = seq.prompt_ids[first + 1: min(first + n_rows, seq.num_prompt_tokens - 1) + 1]
                if targets:
                    seq.prompt_logprobs.extend(self._sampling.logprobs_of(
                        logits[start: start + len(targets)], targets,
                        [seq.params.prompt_logprobs] * len(targets)))
            start += n_rows

    def _postprocess(self, seq: Sequence, token: int, logprob: Logprob | None = None) -> None:
        seq.output_ids.append(token)
        try:
            seq.sampling.append(token)
        except GrammarError as exc:  # only a row the grammar left without any token gets here
            log.error("request %s: %s", seq.request_id, exc)
            self._finish(seq, FinishReason.ABORT)
            self._outputs.append((seq.request_id, f"the output could not follow response_format: {exc}"))
            return
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
            if seq.detokenizer.stopped or seq.sampling.grammar_finished:
                reason = FinishReason.STOP  # a stop string, or the grammar's document is complete
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.runner.max_model_len:
                reason = FinishReason.LENGTH
        stats = None
        if reason is not None:
            text += seq.detokenizer.flush()  # held-back text at EOS/length; "" after a stop string
            self._finish(seq, reason)
            stats = self._finished[-1]
        delta = Delta(text, [token], reason, seq.num_prompt_tokens, seq.num_output_tokens, stats,
                      logprobs=None if logprob is None else [logprob], num_cached_tokens=seq.num_cached_tokens)
        if seq.params.prompt_logprobs is not None and seq.num_output_tokens == 1:
            delta.prompt_logprobs = seq.prompt_logprobs
        self._outputs.append((seq.request_id, delta))


class ThreadEngine:
    """An EngineCore on a thread of this process (tests, and models too small to need a process)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.on_outputs: EmitBatch = lambda *_: None
        core.emit_batch = lambda batch, stats: self.on_outputs(batch, stats)
        self.on_dead: Callable[[str], None] = lambda _: None
        self._thread = threading.Thread(target=self._run, name="lanner-engine", daemon=True)

    def _run(self) -> None:
        try:
            self.core.run_forever()
        except BaseException as exc:  # pragma: no cover - the loop catches step errors itself
            self.on_dead(f"engine loop crashed: {exc}")
            raise

    def start(self) -> None:
        self._thread.start()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.core.inbox.put(NewRequest(request_id, list(prompt_ids), params))

    def abort(self, request_id: str) -> None:
        self.core.inbox.put(Abort(request_id))

    def shutdown(self, timeout: float | None = None) -> None:
        self.core.inbox.put(Stop())
        self._thread.join(timeout)
