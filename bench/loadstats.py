"""Per-request records and per-level summaries of a load run (pure Python, no I/O).

Definitions (all times in seconds, measured on the client with `time.perf_counter`):

* TTFT: request sent -> first streamed chunk carrying text.
* ITL (inter-token latency): gaps between consecutive text chunks of one request. A server that sends
  one chunk per token (Lanner does, for the bench models, whose tokens all decode to text) makes this
  the per-token gap; a chunk that carries several tokens makes one longer gap.
* TPOT (time per output token): (e2e - TTFT) / (output tokens - 1) per request; tokens come from the
  final `usage` chunk, so it is right even when chunks and tokens differ.
* e2e: request sent -> stream finished.
* Level throughput: total output tokens (from usage) / wall time of the level (first request sent ->
  last request finished); requests/s likewise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES: tuple[int, ...] = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one streamed request measured. `chunk_times` are offsets from the request start."""

    start: float  # perf_counter when sent
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float], qs: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., "p99": ..., "mean": ..., "max": ...} (None when empty)."""
    out: dict[str, float | None] = {f"p{q}": percentile(values, q) for q in qs}
    out["mean"] = sum(values) / len(values) if values else None
    out["max"] = max(values) if values else None
    return out


@dataclass
class LevelSummary:
    concurrency: int
    num_requests: int
    num_errors: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    mean_prompt_tokens: float
    chunks_per_token: float | None  # ~1.0 when every token arrives in its own chunk
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    health_s: dict[str, float | None]
    health_samples: int
    health_errors: int
    errors: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_level(concurrency: int, records: Sequence[RequestRecord], wall_s: float,
                    health_latencies: Sequence[float] = (), health_errors: int = 0) -> LevelSummary:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    chunks = sum(len(r.chunk_times) for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := r.tpot()) is not None]
    errors = sorted({r.error for r in records if r.error})
    return LevelSummary(
        concurrency=concurrency,
        num_requests=len(records),
        num_errors=len(records) - len(ok),
        wall_s=wall_s,
        output_tokens=out_tokens,
        output_tokens_per_s=out_tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        mean_prompt_tokens=sum(r.prompt_tokens for r in ok) / len(ok) if ok else 0.0,
        chunks_per_token=chunks / out_tokens if out_tokens else None,
        ttft_s=distribution(ttfts),
        itl_s=distribution([g for r in ok for g in r.itls()]),
        tpot_s=distribution(tpots),
        e2e_s=distribution([r.e2e for r in ok]),
        health_s=distribution(list(health_latencies)),
        health_samples=len(health_latencies),
        health_errors=health_errors,
        errors=errors[:10],
    )
