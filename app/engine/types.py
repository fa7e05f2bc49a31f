"""Plain data passed between the API side and the engine. No torch here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # client went away or the request was cancelled


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping rules, already validated by the protocol layer."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids checked
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # log-probability of each sampled token, plus this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    grammar: str | None = None  # llguidance grammar the output must follow (response_format; grammar.py)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model (raw logits: before penalties, temperature and filters),
    with the `top` most likely tokens of the same position as (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    """What a request produced in one engine step (text is already detokenized, stop strings removed)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    stats: FinishedStats | None = None  # on the last delta: the sequence's engine timings
    logprobs: list[Logprob] | None = None  # one per token of token_ids, when the request asked for them
    prompt_logprobs: list[Logprob] | None = None  # on the first token's delta: prompt tokens 2..P
    num_cached_tokens: int = 0  # prompt tokens that were already in the KV cache (a reused prefix)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class FinishedStats:
    """Timings of one sequence that left the engine, measured inside the engine (monotonic clock)."""

    finish_reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int
    queue_s: float  # arrival at the engine -> first scheduled (or -> leaving, if never scheduled)
    prefill_s: float | None  # first scheduled -> first token
    decode_s: float | None  # first token -> last token
    num_cached_tokens: int = 0  # prompt tokens reused from the KV cache rather than prefilled


@dataclass
class StepStats:
    """What the engine reports with every batch of outputs: a gauge snapshot, plus the step's figures when
    the batch comes from a forward pass (`batch_size > 0`). Plain data; `app/metrics.py` records it."""

    num_running: int
    num_waiting: int
    kv_usage: float
    batch_size: int = 0
    num_batched_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens prefilled this step
    num_generation_tokens: int = 0  # tokens sampled this step
    step_s: float = 0.0
    inter_token_s: list[float] = field(default_factory=list)
    finished: list[FinishedStats] = field(default_factory=list)


# Commands into an engine loop (API -> worker); plain data, so the API process sends them without importing
# the engine (and torch).
@dataclass
class NewRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Abort:
    request_id: str


class Stop:
    pass
