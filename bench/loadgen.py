"""Async load generator for OpenAI-compatible streaming /v1/completions servers.

For each concurrency level C, C clients run streaming completions back to back (official `openai`
AsyncOpenAI client, `stream=True`, `stream_options={"include_usage": True}`, temperature 0 and, by
default, `ignore_eos` so every request produces exactly --max-tokens tokens). A level ends after
--requests-per-level requests (at least C) or, with --duration, when no client starts a new request
after S seconds (requests in flight finish). Per request it records TTFT, the gaps between text chunks,
end-to-end latency and the token counts from `usage` (random-weight models can produce chunks that are
not one token each, so tokens are never counted from text). A separate process GETs /health every
50 ms during the whole run to measure how responsive the server's event loop stays under load.

Writes <out>.json (everything), <out>.md (a table) and <out>.png (throughput, TTFT and ITL vs
concurrency); with --compare other.json, both runs share the charts and the table gets ratio columns.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

from loadstats import LevelSummary, RequestRecord, summarize_level  # noqa: E402
from report import plot_results, result_markdown  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HEALTH_INTERVAL_S = 0.05
ISA_FLAGS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni",
             "avx512_bf16": "avx512_bf16", "avx_vnni": "avx_vnni", "amx_tile": "amx_tile",
             "amx_bf16": "amx_bf16", "amx_int8": "amx_int8"}
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing in an old oak tree near "
    "river bank where children play games every summer evening and their parents talk about work food "
    "travel weather music books history science markets gardens mountains oceans cities trains bridges "
    "light water stone bread honey silver winter morning window letter story question answer number "
    "friend teacher doctor farmer engine garden kitchen village harbour island forest meadow lantern"
).split()


# --------------------------------------------------------------------------- machine info


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        model = platform.processor() or "unknown"
    return model, flags


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "isa": {name: flag in flags for name, flag in ISA_FLAGS.items()},
        "mem_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "openai": _version("openai"),
        "git_commit": _git_commit(),
        "hostname": platform.node(),
    }


# --------------------------------------------------------------------------- /health prober


def server_root(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port"""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _probe_health(url: str, interval: float, conn: Connection) -> None:
    """Child process: GET `url` every `interval` s until told to stop; send back (t, latency|None)."""
    import httpx

    samples: list[tuple[float, float | None]] = []
    with httpx.Client(timeout=5.0) as client:
        conn.send("started")
        next_t = time.monotonic()
        while not conn.poll():
            t0 = time.monotonic()
            try:
                ok = client.get(url).status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append((t0, time.monotonic() - t0 if ok else None))
            next_t += interval
            time.sleep(max(0.0, next_t - time.monotonic()))
            next_t = max(next_t, time.monotonic() - interval)  # no catch-up bursts after a slow probe
    conn.send(samples)


class HealthProber:
    """Runs `_probe_health` in its own process so the load generator's event loop can't delay it."""

    def __init__(self, url: str, interval: float = HEALTH_INTERVAL_S) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_probe_health, args=(url, interval, child), daemon=True)
        self.samples: list[tuple[float, float | None]] = []

    def __enter__(self) -> HealthProber:
        self._proc.start()
        if not self._conn.poll(30) or self._conn.recv() != "started":
            raise RuntimeError("the /health prober process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        if self._conn.poll(30):
            self.samples = self._conn.recv()
        self._proc.join(10)

    def window(self, t0: float, t1: float) -> tuple[list[float], int]:
        """(latencies, error count) of probes started in [t0, t1] (time.monotonic)."""
        inside = [lat for t, lat in self.samples if t0 <= t <= t1]
        return [lat for lat in inside if lat is not None], sum(lat is None for lat in inside)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class LoadSettings:
    model: str
    max_tokens: int
    ignore_eos: bool
    temperature: float


def make_prompt(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words)).capitalize() + "."


async def stream_one(client: Any, settings: LoadSettings, prompt: str, max_tokens: int | None = None
                     ) -> RequestRecord:
    """One streamed completion; every failure is recorded in `error`, never raised."""
    record = RequestRecord(start=time.perf_counter())
    extra = {"ignore_eos": True} if settings.ignore_eos else None
    got_usage = False
    try:
        stream = await client.completions.create(
            model=settings.model, prompt=prompt, max_tokens=max_tokens or settings.max_tokens,
            temperature=settings.temperature, stream=True, stream_options={"include_usage": True},
            extra_body=extra,
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                record.chunk_times.append(now - record.start)
            if chunk.usage is not None:
                got_usage = True
                record.prompt_tokens = chunk.usage.prompt_tokens
                record.output_tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures instead of stopping
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    record.end = time.perf_counter()
    if record.error is None and not got_usage:
        record.error = "stream ended without a usage chunk"
    return record


async def calibrate_words(client: Any, settings: LoadSettings, target_tokens: int, seed: int) -> int:
    """Number of prompt words that tokenizes to ~target_tokens on this server (via usage.prompt_tokens)."""
    words = max(1, target_tokens)
    for _ in range(3):
        record = await stream_one(client, settings, make_prompt(words, seed), max_tokens=1)
        if record.error:
            raise RuntimeError(f"calibration request failed: {record.error}")
        if record.prompt_tokens == target_tokens or record.prompt_tokens == 0:
            break
        words = max(1, round(words * target_tokens / record.prompt_tokens))
    return words


async def run_level(client: Any, settings: LoadSettings, concurrency: int, prompts: list[str],
                    num_requests: int | None, duration: float | None, ramp: float = 0.0
                    ) -> tuple[list[RequestRecord], float]:
    """C workers issuing requests back to back; returns (records, wall seconds). With `ramp` > 0, worker i
    sends its first request at i * ramp / C seconds (users arriving over time) instead of all at once."""
    records: list[RequestRecord] = []
    issued = 0
    t0 = time.perf_counter()

    def next_index() -> int | None:
        nonlocal issued
        if duration is not None and time.perf_counter() - t0 >= duration:
            return None
        if num_requests is not None and issued >= num_requests:
            return None
        issued += 1
        return issued - 1

    async def worker(k: int) -> None:
        if ramp > 0:
            await asyncio.sleep(k * ramp / concurrency)  # an arrival schedule, not synchronisation
        while (i := next_index()) is not None:
            records.append(await stream_one(client, settings, prompts[i % len(prompts)]))

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return records, time.perf_counter() - t0


# --------------------------------------------------------------------------- run


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"bad concurrency list {text!r}")
    return levels


def _level_line(s: LevelSummary) -> str:
    def ms(d: dict[str, float | None], q: str) -> str:
        return "—" if d[q] is None else f"{d[q] * 1000:.0f}"

    return (f"c={s.concurrency:<3} reqs={s.num_requests:<4} err={s.num_errors:<3} "
            f"{s.output_tokens_per_s:8.1f} tok/s {s.requests_per_s:6.2f} req/s  "
            f"TTFT p50/p99 {ms(s.ttft_s, 'p50')}/{ms(s.ttft_s, 'p99')} ms  "
            f"ITL p50/p99 {ms(s.itl_s, 'p50')}/{ms(s.itl_s, 'p99')} ms  "
            f"/health p50/p99 {ms(s.health_s, 'p50')}/{ms(s.health_s, 'p99')} ms ({s.health_samples})")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from openai import AsyncOpenAI

    settings = LoadSettings(model=args.model, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                            temperature=args.temperature)
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                         timeout=args.request_timeout)
    models = [m.id async for m in client.models.list()]
    if args.model not in models:
        raise SystemExit(f"model {args.model!r} not served at {args.base_url} (serves: {', '.join(models)})")
    words = await calibrate_words(client, settings, args.prompt_tokens, args.seed)
    prompts = [make_prompt(words, args.seed + i) for i in range(max(64, max(args.concurrency)))]
    for i in range(args.warmup):
        await stream_one(client, settings, prompts[i % len(prompts)], max_tokens=min(8, args.max_tokens))
    print(f"prompts: {words} words (~{args.prompt_tokens} tokens); {args.warmup} warm-up request(s) done",
          file=sys.stderr)

    levels: list[LevelSummary] = []
    with HealthProber(server_root(args.base_url) + "/health") as prober:
        spans = []
        for c in args.concurrency:
            n = None if args.duration else max(args.requests_per_level, c)
            t_start = time.monotonic()
            records, wall = await run_level(client, settings, c, prompts, n, args.duration, args.ramp)
            spans.append((c, records, wall, t_start, time.monotonic()))
            print(f"c={c}: {len(records)} requests in {wall:.1f} s", file=sys.stderr)
    for c, records, wall, t0, t1 in spans:
        lat, errs = prober.window(t0, t1)
        summary = summarize_level(c, records, wall, lat, errs)
        levels.append(summary)
        print(_level_line(summary))
    await client.close()
    return {
        "name": args.name or Path(args.out).name,
        "started_at": args.started_at,
        "settings": {
            "base_url": args.base_url, "model": args.model, "concurrency": args.concurrency,
            "requests_per_level": None if args.duration else args.requests_per_level,
            "duration_s": args.duration, "prompt_tokens": args.prompt_tokens, "prompt_words": words,
            "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "temperature": args.temperature,
            "warmup": args.warmup, "health_interval_s": HEALTH_INTERVAL_S, "ramp_s": args.ramp,
            "mode": f"{args.duration:g} s per level" if args.duration
            else f"{args.requests_per_level} requests per level (at least C)",
        },
        "machine": machine_info(),
        "levels": [s.to_dict() for s in levels],
    }


def write_outputs(result: dict[str, Any], out: Path, compare: dict[str, Any] | None) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{out}.{ext}") for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(result_markdown(result, compare), encoding="utf-8")
    plot_results([result, compare] if compare else [result], paths[2],
                 title=f"{result['name']}" + (f" vs {compare['name']}" if compare else ""))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--model", required=True, help="model id to request")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    p.add_argument("--concurrency", type=parse_levels, default=parse_levels("1,2,4,8,16,32"),
                   help="comma-separated concurrency levels")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--requests-per-level", type=int, default=32,
                      help="requests per level (at least the level's concurrency)")
    mode.add_argument("--duration", type=float, default=None, help="seconds per level instead of a request count")
    p.add_argument("--prompt-tokens", type=int, default=30, help="approximate prompt length (calibrated on the server)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so each request produces exactly --max-tokens tokens")
    p.add_argument("--warmup", type=int, default=2, help="short warm-up requests before the first level")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="spread each level's first requests over this many seconds (0: all clients at once)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt texts")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "load",
                   help="output path without suffix: writes .json, .md and .png")
    p.add_argument("--name", default=None, help="label in tables and charts (default: the --out file name)")
    p.add_argument("--compare", type=Path, default=None, help="a result JSON to compare against")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    compare = json.loads(args.compare.read_text(encoding="utf-8")) if args.compare else None
    result = asyncio.run(run(args))
    for path in write_outputs(result, args.out, compare):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
