"""Soak: a real `lanner serve` held at twice its capacity for minutes (not a CI test).

1. capacity: `max_num_seqs` closed-loop clients for --calibrate seconds -> completed requests/s;
2. soak: open-loop Poisson arrivals at --overload x capacity for --duration seconds, each a streaming
   completion of --max-tokens tokens. Every response is classified: completed, rejected (429/503, as
   designed), or failed (anything else, or an accepted stream that broke). Every 5 s the RSS of the server
   and its worker processes is read from /proc; latency of completed requests is tracked per minute.

Verdicts (printed and written to bench/results/soak.{json,md,png}):
  0 failed accepted requests; every rejection is 429 or 503; RSS growth < 5% from the end of the first
  minute to the end; p99 latency of completed requests in the last minute <= 1.5 x that of the first.

    python bench/soak.py                       # demo-llama, 10 minutes at 2x
    python bench/soak.py --duration 120 --model ~/.cache/lanner/bench-models/tinyllama-1.1b
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import machine_info  # noqa: E402
from loadstats import percentile  # noqa: E402
from run_load import stop, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and its children (the model workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


async def one_request(c: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[str, float, int | None]:
    """-> (outcome, seconds, status); outcome: completed | rejected | failed."""
    t0 = time.monotonic()
    body = {"model": model, "prompt": "Soak test prompt about rivers and mountains", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code in (429, 503):
                await r.aread()
                return "rejected", time.monotonic() - t0, r.status_code
            if r.status_code != 200:
                await r.aread()
                return "failed", time.monotonic() - t0, r.status_code
            tokens, done = None, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return "failed", time.monotonic() - t0, 200
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            ok = done and tokens == max_tokens
            return ("completed" if ok else "failed"), time.monotonic() - t0, 200
    except httpx.HTTPError as exc:
        return "failed", time.monotonic() - t0, type(exc).__name__


async def calibrate(base: str, model: str, clients: int, seconds: float, max_tokens: int) -> float:
    done = 0
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        async def loop() -> None:
            nonlocal done
            while time.monotonic() < end:
                outcome, _, _ = await one_request(c, model, max_tokens)
                done += outcome == "completed"
        t0 = time.monotonic()
        await asyncio.gather(*[loop() for _ in range(clients)])
        return done / (time.monotonic() - t0)


async def soak(base: str, pid: int, model: str, rate: float, seconds: float, max_tokens: int) -> dict:
    records: list[dict] = []
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        async def sample_rss() -> None:
            while time.monotonic() - start < seconds:
                rss.append((time.monotonic() - start, tree_rss(pid)))
                await asyncio.sleep(5)

        async def request(at: float) -> None:
            outcome, secs, status = await one_request(c, model, max_tokens)
            records.append({"t": at, "outcome": outcome, "seconds": secs, "status": status})

        tasks, rng = [], random.Random(0)
        sampler = asyncio.create_task(sample_rss())
        next_at = 0.0
        while next_at < seconds:
            await asyncio.sleep(max(0.0, start + next_at - time.monotonic()))  # Poisson arrival schedule
            tasks.append(asyncio.create_task(request(next_at)))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        await sampler
        rss.append((time.monotonic() - start, tree_rss(pid)))
    return {"records": records, "rss": rss}


def verdicts(result: dict, duration: float) -> dict:
    recs = result["records"]
    completed = [r for r in recs if r["outcome"] == "completed"]
    rejected = [r for r in recs if r["outcome"] == "rejected"]
    failed = [r for r in recs if r["outcome"] == "failed"]
    minutes = max(1, int(duration // 60))
    p99_by_minute = []
    for m in range(minutes):
        lat = [r["seconds"] for r in completed if m * 60 <= r["t"] < (m + 1) * 60]
        p99_by_minute.append(percentile(lat, 99) if lat else None)
    rss = result["rss"]
    base_rss = next((v for t, v in rss if t >= 60), rss[0][1])
    growth = rss[-1][1] / base_rss - 1
    first = next((p for p in p99_by_minute if p), None)
    last = next((p for p in reversed(p99_by_minute) if p), None)
    return {
        "requests": len(recs), "completed": len(completed), "rejected": len(rejected), "failed": len(failed),
        "rejection_statuses": sorted({r["status"] for r in rejected}),
        "failure_kinds": {str(k): n for k, n in Counter(r["status"] for r in failed).items()},
        "rss_first_minute_mib": base_rss / 2**20, "rss_end_mib": rss[-1][1] / 2**20, "rss_growth": growth,
        "p99_by_minute_s": p99_by_minute,
        "checks": {
            "no failed accepted request": not failed,
            "every rejection is 429/503": all(r["status"] in (429, 503) for r in rejected),
            "RSS growth < 5%": growth < 0.05,
            "p99 stable (last minute <= 1.5x first)": bool(first and last and last <= 1.5 * first),
        },
    }


def write(summary: dict, result: dict, info: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # one compact row per request, [arrival s, outcome, seconds, status], keeps the file under 1 MB
    rows = [[round(r["t"], 3), r["outcome"], round(r["seconds"], 3), r["status"]] for r in result["records"]]
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "summary": summary, "rss": result["rss"],
         "records_columns": ["t", "outcome", "seconds", "status"], "records": rows}, separators=(",", ":")))
    lines = [f"# Soak: {info['config']['overload']}x capacity for {info['config']['duration_s']:.0f} s", "",
             f"Model `{info['config']['model']}`, capacity {info['config']['capacity_rps']:.2f} req/s, "
             f"offered {info['config']['rate_rps']:.2f} req/s, {info['config']['max_tokens']} tokens each. "
             f"CPU: {info.get('cpu_model', '?')}.", "",
             "| requests | completed | rejected (429/503) | failed | RSS 1st min → end | growth |",
             "|---|---|---|---|---|---|",
             f"| {summary['requests']} | {summary['completed']} | {summary['rejected']} "
             f"{summary['rejection_statuses']} | {summary['failed']} | {summary['rss_first_minute_mib']:.0f} → "
             f"{summary['rss_end_mib']:.0f} MiB | {summary['rss_growth'] * 100:+.2f}% |", "",
             "p99 latency of completed requests per minute (s): " + ", ".join(
                 f"{p:.2f}" if p else "-" for p in summary["p99_by_minute_s"]), ""]
    if summary["failure_kinds"]:
        lines += ["Failed requests by HTTP status or client exception: " + ", ".join(
            f"{k}: {n}" for k, n in summary["failure_kinds"].items()), ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in summary["checks"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t, v = zip(*result["rss"])
    a.plot(t, [x / 2**20 for x in v])
    a.set(xlabel="s", ylabel="RSS MiB (server + workers)", title="memory")
    done = [r for r in result["records"] if r["outcome"] == "completed"]
    a2 = b
    a2.scatter([r["t"] for r in done], [r["seconds"] for r in done], s=3, label="completed")
    rej = [r for r in result["records"] if r["outcome"] == "rejected"]
    a2.scatter([r["t"] for r in rej], [r["seconds"] for r in rej], s=3, label="rejected", color="tab:red")
    a2.set(xlabel="arrival s", ylabel="latency s", title="requests")
    a2.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the demo-llama demo model)")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--calibrate", type=float, default=30)
    p.add_argument("--overload", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--out", type=Path, default=RESULTS / "soak")
    args = p.parse_args(argv)
    if args.model is None:
        from app.config import default_cache_dir
        from app.models.demo import ensure_demo_models

        args.model = str(ensure_demo_models(default_cache_dir() / "demo-models")["demo-llama"])
    base = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "app", "serve", "--model", args.model, "--model-id", "soak", "--port",
           str(args.port), "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "LANNER_QUEUE_TIMEOUT": "60"})
    try:
        wait_ready(f"{base}/ready", proc, 900)
        capacity = asyncio.run(calibrate(base, "soak", args.max_num_seqs, args.calibrate, args.max_tokens))
        rate = args.overload * capacity
        print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {args.duration:.0f} s", flush=True)
        result = asyncio.run(soak(base, proc.pid, "soak", rate, args.duration, args.max_tokens))
    finally:
        stop(proc)
    info = machine_info()
    info["config"] = {"model": args.model, "duration_s": args.duration, "overload": args.overload,
                      "capacity_rps": capacity, "rate_rps": rate, "max_tokens": args.max_tokens,
                      "max_num_seqs": args.max_num_seqs}
    summary = verdicts(result, args.duration)
    write(summary, result, info, args.out)
    print(args.out.with_suffix(".md").read_text())
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
