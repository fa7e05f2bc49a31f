"""Where does an engine step's time go? py-spy samples a model's worker process under N streams.

    python bench/profile_engine.py --model-dir ~/.cache/lanner/bench-models/tinyllama-1.1b --streams 16

Starts `lanner serve` on the model, keeps N streaming clients busy (bench/loadgen.py), records the worker
with py-spy for `--seconds`, and buckets every sample by the innermost engine function on its stack:
the forward pass (`runner.step`), sampling, detokenization/stop rules, scheduling, sending outputs, and
idle (waiting for work). Writes `<out>.md` and `<out>.json`. Needs `py-spy` (pip) and ptrace rights
(root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

# innermost match wins: checked from the leaf of each stack towards the root. A frame matches a rule
# (function prefix, file suffix) when py-spy's "function (path/file.py:line)" has both.
BUCKETS = [
    ("forward pass", (("BatchedRunner.step", "runner.py"), ("ReferenceRunner.step", "reference.py"))),
    ("sampling", (("", "engine/sampler.py"),)),
    ("detokenize + stop rules", (("", "engine/detokenizer.py"), ("EngineCore._postprocess", "worker.py"))),
    ("scheduling", (("", "engine/scheduler.py"), ("Sequence.", "engine/sequence.py"))),
    ("sending outputs", (("EngineCore._flush", "worker.py"),)),
    ("waiting for work", (("EngineCore._drain_inbox", "worker.py"),)),
    ("engine step (other)", (("EngineCore.step", "worker.py"),)),
]


def _matches(frame: str, rule: tuple[str, str]) -> bool:
    func, _, where = frame.partition(" (")
    return func.startswith(rule[0]) and rule[1] in where.split(":")[0]


def bucket_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, rules in BUCKETS:
            if any(_matches(frame, r) for r in rules):
                return name
    return "other"


def worker_pid(server_pid: int, model_id: str) -> int:
    name = f"lw:{model_id}"[:15]
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for kid in (task / "children").read_text().split():
            if Path(f"/proc/{kid}/comm").read_text().strip() == name:
                return int(kid)
    raise RuntimeError("worker process not found")


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--model-id", default="bench")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8010)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `lanner serve` argument")
    ap.add_argument("--out", default=str(REPO / "bench/results/engine-profile"))
    args = ap.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "app", "serve", "--model", args.model_dir, "--model-id",
                               args.model_id, "--port", str(args.port), "--max-num-seqs", str(args.streams),
                               "--log-level", "warning", *args.serve_arg], cwd=REPO)
    load = None
    try:
        wait_ready(base, server)
        wpid = worker_pid(server.pid, args.model_id)
        load = subprocess.Popen([sys.executable, str(REPO / "bench/loadgen.py"), "--base-url", f"{base}/v1",
                                 "--model", args.model_id, "--concurrency", str(args.streams), "--duration",
                                 str(args.seconds + 60), "--max-tokens", str(args.max_tokens), "--warmup", "0",
                                 "--out", f"{args.out}-load"], cwd=REPO, stdout=subprocess.DEVNULL)
        time.sleep(20)  # let every stream get past its prefill before sampling the steady state
        raw = Path(f"{args.out}.collapsed")
        subprocess.run([py_spy, "record", "--pid", str(wpid), "--duration", str(int(args.seconds)), "--rate", "200",
                        "--format", "raw", "--output", str(raw), "--nonblocking", "--idle"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if load is not None:
            load.terminate()
            load.wait()
        server.terminate()
        server.wait(60)

    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "worker_main" in stack:  # the engine thread (the command pump thread is not part of a step)
            counts[bucket_of(stack)] += int(n)
    total = sum(counts.values())
    busy = total - counts["waiting for work"]
    rows = [(name, counts[name]) for name, _ in BUCKETS if counts[name]] + \
        [(k, v) for k, v in counts.items() if k not in dict(BUCKETS)]
    overhead = busy - counts["forward pass"]
    lines = [f"# Engine profile: {args.streams} streams, {args.seconds:g} s of py-spy samples",
             "", f"- model `{args.model_dir}`, serve args {args.serve_arg or 'none'}, max_tokens {args.max_tokens}",
             f"- {total} samples of the worker's main thread; busy (not waiting for work): {busy}",
             f"- **engine overhead outside the forward pass: {100 * overhead / max(busy, 1):.1f}% of busy time**",
             "", "| where | samples | % of busy time |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {100 * v / max(busy, 1):.1f} |" for k, v in rows]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"samples": dict(counts), "busy": busy,
                                                    "overhead_fraction": overhead / max(busy, 1),
                                                    "streams": args.streams, "seconds": args.seconds}, indent=2))
    print("\n".join(lines))
    os.remove(raw)


if __name__ == "__main__":
    main()
