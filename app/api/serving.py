"""What completions and chat share: limits checks, fan-out of prompts x n to the engine, and merging
the per-choice Delta streams into one ordered stream for SSE or into final choices.

Everything that can reject a request runs before the first byte is sent, so a bad streaming request
gets a 4xx, never a 200 followed by an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from app.api.errors import (
    APIError,
    ContextLengthExceededError,
    DeadlineExceededError,
    EngineFailureError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    current_model_metrics,
)
from app.api.limits import Ticket
from app.engine.client import EngineDeadError
from app.engine.registry import ModelHandle, ModelRegistry
from app.engine.types import Delta, FinishReason, Logprob, SamplingParams
from app.protocol.openai import SamplingFields


def get_model(registry: ModelRegistry, model_id: str) -> ModelHandle:
    handle = registry.get(model_id)
    if handle is None:
        raise ModelNotFoundError(model_id)
    current_model_metrics.set(handle.metrics)
    if not handle.is_ready:
        detail = "is unavailable (its engine failed)" if handle.state == "failed" else "is still loading"
        raise ServiceUnavailableError(f"The model `{model_id}` {detail}; try again later.")
    return handle


def check_token_ids(handle: ModelHandle, ids: Sequence[int], param: str) -> None:
    vocab = handle.vocab_size
    for i in ids:
        if not 0 <= i < vocab:
            raise InvalidRequestError(f"Token id {i} is out of vocabulary (valid ids: 0..{vocab - 1}).",
                                      param=param)


def check_sampling_token_ids(handle: ModelHandle, body: SamplingFields) -> None:
    """The token ids a request's sampling fields name (stop_token_ids, logit_bias) exist in the model."""
    if body.stop_token_ids:
        check_token_ids(handle, body.stop_token_ids, "stop_token_ids")
    check_token_ids(handle, body.logit_bias_ids, "logit_bias")


def check_grammar_support(handle: ModelHandle, params: SamplingParams, param: str) -> None:
    """A grammar (response_format, tool calls) is enforced with the tokenizer's Rust backend."""
    if params.grammar is not None and getattr(handle.tokenizer, "backend_tokenizer", None) is None:
        raise InvalidRequestError(f"The model `{handle.id}` has a slow (Python) tokenizer; structured output "
                                  "and tool calls need a fast one (tokenizer.json).", param=param)


def resolve_max_tokens(handle: ModelHandle, prompt_len: int, requested: int | None, prompt_param: str) -> int:
    limit = handle.max_model_len
    if prompt_len == 0:
        raise InvalidRequestError("The prompt is empty after tokenization.", param=prompt_param)
    if prompt_len >= limit:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{prompt_len} tokens.", param=prompt_param)
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            "Please reduce the prompt or max_tokens.", param="max_tokens")
    return requested


@dataclass
class ChoiceResult:
    index: int
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[Logprob] | None = None  # one per sampled token, when asked for
    prompt_logprobs: list[Logprob] | None = None  # prompt tokens 2..P, when asked for (echo)
    num_cached_tokens: int = 0  # prompt tokens reused from the KV cache


@dataclass
class Job:
    """One engine request: a choice of the response."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


def make_jobs(prompts: list[list[int]], params: list[SamplingParams], n: int) -> list[Job]:
    """prompts x n choices, indexed as OpenAI does (prompt-major). Seeded requests get seed + j per choice
    so the n choices differ but stay reproducible."""
    jobs = []
    for p, (ids, sp) in enumerate(zip(prompts, params)):
        for j in range(n):
            choice_params = sp if sp.seed is None or j == 0 else dataclasses.replace(sp, seed=sp.seed + j)
            jobs.append(Job(p * n + j, ids, choice_params))
    return jobs


@dataclass
class Deadlines:
    """When a request must have its first token (queue timeout) and be complete (request timeout),
    on the time.monotonic() clock, counted from its arrival."""

    arrival: float
    first_token: float
    done: float

    @classmethod
    def start(cls, queue_timeout: float, request_timeout: float) -> Deadlines:
        now = time.monotonic()
        return cls(now, now + queue_timeout, now + request_timeout)


@dataclass
class Admitted:
    """An accepted request: its jobs, its queue reservation and its deadlines."""

    handle: ModelHandle
    jobs: list[Job]
    ticket: Ticket
    deadlines: Deadlines


def admit(handle: ModelHandle, jobs: list[Job], deadlines: Deadlines) -> Admitted:
    """Reserve room in the model's waiting queue before anything is sent (429 when it is full)."""
    return Admitted(handle, jobs, handle.admission.admit([len(j.prompt_ids) for j in jobs]), deadlines)


async def stream_jobs(req: Admitted) -> AsyncIterator[tuple[int, Delta]]:
    """Run every job on the engine and yield (choice index, delta) as they arrive."""
    try:
        if len(req.jobs) == 1:
            async for delta in _guard(req, 0):
                yield req.jobs[0].index, delta
            return
        out: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()

        async def pump(pos: int) -> None:
            try:
                async for delta in _guard(req, pos):
                    await out.put((req.jobs[pos].index, delta))
            except Exception as exc:
                await out.put(exc)
            finally:
                await out.put(None)

        tasks = [asyncio.create_task(pump(pos)) for pos in range(len(req.jobs))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await out.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise _engine_error(item)
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        req.ticket.release()


async def _guard(req: Admitted, pos: int) -> AsyncIterator[Delta]:
    """One job's deltas under the request's deadlines. Leaving early (deadline, client gone) closes the
    engine iterator, which aborts the engine request and frees its KV slot."""
    job, deadlines = req.jobs[pos], req.deadlines
    it = req.handle.client.add_request(_rid(), job.prompt_ids, job.params, deadlines.arrival)
    waiting_first = True
    try:
        while True:
            deadline = min(deadlines.first_token, deadlines.done) if waiting_first else deadlines.done
            try:
                d = await asyncio.wait_for(anext(it), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                which = "queue_timeout" if waiting_first and deadline < deadlines.done else "request_timeout"
                what = "waited too long for its first token" if which == "queue_timeout" else "ran out of time"
                raise DeadlineExceededError(f"The request {what} ({which} exceeded); retry later.",
                                            code=which) from None
            except EngineDeadError as exc:
                raise _engine_error(exc) from exc
            if waiting_first and d.token_ids:
                waiting_first = False
                req.ticket.first_token(pos)
            if d.finish_reason is FinishReason.ABORT:  # only the engine shutting down delivers this
                raise ServiceUnavailableError("The server is shutting down; the request was not completed.")
            yield d
    finally:
        req.ticket.done(pos)
        await it.aclose()


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    return EngineFailureError("The engine failed while generating this completion.")


async def collect_jobs(req: Admitted) -> list[ChoiceResult]:
    results = {j.index: ChoiceResult(j.index, "", None, len(j.prompt_ids), 0) for j in req.jobs}
    parts: dict[int, list[str]] = {j.index: [] for j in req.jobs}
    async for index, delta in stream_jobs(req):
        parts[index].append(delta.text)
        res = results[index]
        res.num_output_tokens = delta.num_output_tokens
        res.num_cached_tokens = delta.num_cached_tokens
        if delta.logprobs is not None:
            res.logprobs = (res.logprobs or []) + delta.logprobs
        if delta.prompt_logprobs is not None:
            res.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            res.finish_reason = delta.finish_reason.value
    for index, res in results.items():
        res.text = "".join(parts[index])
    return [results[i] for i in sorted(results)]


def usage(prompts: list[list[int]], completion_tokens: int, cached: dict[int, int] | None = None) -> dict:
    """OpenAI counts each distinct prompt once, however many choices (n) it has. `cached`: each choice's
    prompt tokens found in the KV cache (by choice index, prompt-major); a prompt counts its choices' least
    (the others copied what the first computed: that prompt was still computed once)."""
    prompt = sum(len(p) for p in prompts)
    n = max(1, len(cached or {}) // max(1, len(prompts)))
    by_prompt: dict[int, int] = {}
    for index, c in (cached or {}).items():
        by_prompt[index // n] = min(by_prompt.get(index // n, c), c)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(by_prompt.values())}}


def _rid() -> str:
    return uuid.uuid4().hex
