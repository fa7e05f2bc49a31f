"""Same-run load comparison: Lanner vs a baseline server on the same model and settings.

The baseline is the HF `generate()` server (`bench/baseline_server.py`, default) or, with
`--baseline llama-server`, llama.cpp's own server (slots with continuous batching, `bench/llama_server.py`)
on a GGUF of the same weights in Lanner's quantization (`--lanner-arg=--quantize=int8` -> Q8_0, int4 ->
Q4_0), one slot per client of the highest level, at Lanner's levels.

Steps: build (or reuse) the bench model; start the baseline, wait for /health, run loadgen, stop it
(SIGTERM); then the same for Lanner (`python -m app serve ... --max-num-seqs N`, waiting for /ready).
The servers never run at the same time, so neither shares the cores with the other. Results go to
--results-dir:

  lanner-load.{json,md,png}     Lanner's levels (default 1,2,4,8,16,32)
  baseline-load.{json,md,png}   the baseline's levels (default 1,4,16: it serialises requests)
  load-comparison.{md,png}      both runs, with Lanner@16 / Lanner@1 and Lanner@16 / baseline@16
  *.log                         the servers' logs

`--quick` smoke-runs the whole pipeline in seconds on the tiny demo-llama model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

from report import comparison_markdown, plot_results  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_CACHE = Path("~/.cache/lanner").expanduser()


def log(msg: str) -> None:
    print(f"run_load: {msg}", file=sys.stderr, flush=True)


def bench_model_dir(args: argparse.Namespace) -> Path:
    """The model to serve: --model-dir, the demo-llama model (--quick), or the built bench model."""
    if args.model_dir:
        return args.model_dir
    if args.quick:
        sys.path.insert(0, str(REPO_ROOT))
        from app.models.demo import ensure_demo_models

        return ensure_demo_models(args.cache_dir / "bench-demo", progress=log)["demo-llama"]
    from make_models import ensure_model

    path, built = ensure_model(args.bench_model, args.cache_dir / "bench-models")
    log(f"{'built' if built else 'reusing'} {args.bench_model} at {path}")
    return path


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_against(name: str, label: str, server_cmd: Sequence[str], ready_path: str, port: int, levels: str,
                args: argparse.Namespace, compare: Path | None = None) -> Path:
    """Start a server, wait until ready, run loadgen (results `name`.*, labelled `label`), stop the server.

    Returns the result JSON path."""
    out = args.results_dir / name
    log_path = args.results_dir / f"{name}-server.log"
    log(f"starting {name}: {' '.join(server_cmd)} (log: {log_path})")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(server_cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready_path}", proc, args.ready_timeout)
            cmd = [sys.executable, str(BENCH_DIR / "loadgen.py"), "--base-url", f"http://127.0.0.1:{port}/v1",
                   "--model", args.model_id, "--concurrency", levels, "--max-tokens", str(args.max_tokens),
                   "--prompt-tokens", str(args.prompt_tokens), "--out", str(out), "--name", label,
                   "--warmup", str(args.warmup), "--ramp", str(args.ramp)]
            cmd += ["--duration", str(args.duration)] if args.duration else [
                "--requests-per-level", str(args.requests_per_level)]
            if compare is not None:
                cmd += ["--compare", str(compare)]
            log(f"load: {' '.join(cmd[1:])}")
            subprocess.run(cmd, check=True)
        finally:
            stop(proc)
    return Path(f"{out}.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: demo-llama, levels 1,2 for both, 4 requests, 16 tokens")
    p.add_argument("--model-dir", type=Path, default=None, help="serve this HF directory instead of a bench model")
    p.add_argument("--bench-model", default="tinyllama-1.1b", choices=["tinyllama-1.1b", "falcon-7b-layout"])
    p.add_argument("--model-id", default=None, help="id served and requested (default: tinyllama / falcon / demo-llama)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="bench-models/ and bench-demo/ live here")
    p.add_argument("--levels", default="1,2,4,8,16,32", help="Lanner's concurrency levels")
    p.add_argument("--baseline", choices=["generate", "llama-server"], default="generate",
                   help="HF generate() (serialises requests) or llama.cpp's llama-server")
    p.add_argument("--baseline-levels", default=None,
                   help="the baseline's concurrency levels (default 1,4,16 for generate, Lanner's for llama-server)")
    p.add_argument("--requests-per-level", type=int, default=32)
    p.add_argument("--duration", type=float, default=None, help="seconds per level instead of a request count")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which each level's clients arrive")
    p.add_argument("--max-num-seqs", type=int, default=32, help="Lanner's --max-num-seqs")
    p.add_argument("--lanner-arg", action="append", default=[],
                   help="extra argument for `app serve` (repeatable), e.g. --lanner-arg=--quantize=int8")
    p.add_argument("--port", type=int, default=8000, help="Lanner's port")
    p.add_argument("--baseline-port", type=int, default=8001)
    p.add_argument("--skip-lanner", action="store_true", help="reuse an existing lanner-load.json")
    p.add_argument("--skip-baseline", action="store_true", help="reuse an existing baseline-load.json")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for a server to load")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    return p


def apply_quick(args: argparse.Namespace) -> None:
    args.levels = args.baseline_levels = "1,2"
    args.requests_per_level, args.max_tokens, args.warmup = 4, 16, 1


def lanner_quantize(lanner_args: Sequence[str]) -> str:
    """The --quantize among Lanner's extra arguments ("none" without one)."""
    for i, arg in enumerate(lanner_args):
        if arg.startswith("--quantize="):
            return arg.split("=", 1)[1]
        if arg == "--quantize" and i + 1 < len(lanner_args):
            return lanner_args[i + 1]
    return "none"


def baseline_command(args: argparse.Namespace, model_dir: Path) -> tuple[list[str], str]:
    """The baseline server's command and its label."""
    if args.baseline == "generate":
        return [sys.executable, str(BENCH_DIR / "baseline_server.py"), "--model", str(model_dir), "--model-id",
                args.model_id, "--port", str(args.baseline_port)], "baseline"
    from gguf_convert import ensure_ggufs
    from llama_server import GGUF_FOR_QUANTIZE, ensure_llama_server, server_command

    gguf_type = GGUF_FOR_QUANTIZE.get(lanner_quantize(args.lanner_arg))
    if gguf_type is None:
        raise SystemExit("--baseline llama-server compares quantized serving: pass --lanner-arg=--quantize=int8 "
                         "(against Q8_0) or int4 (against Q4_0)")
    gguf = ensure_ggufs(model_dir, [gguf_type])[gguf_type]
    slots = max(int(c) for c in args.baseline_levels.split(","))
    slot_tokens = -(-(args.prompt_tokens * 2 + args.max_tokens + 64) // 256) * 256  # room for the prompt
    cmd = server_command(ensure_llama_server(), gguf, args.model_id, args.baseline_port, slots, slot_tokens,
                         threads=len(os.sched_getaffinity(0)))
    return cmd, f"llama-server-{gguf_type}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.baseline_levels is None:
        args.baseline_levels = "1,4,16" if args.baseline == "generate" else args.levels
    if args.quick:
        apply_quick(args)
    if args.model_id is None:
        args.model_id = "demo-llama" if args.quick else args.bench_model.split("-")[0]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    model_dir = bench_model_dir(args)
    py = sys.executable
    baseline_json = args.results_dir / "baseline-load.json"
    lanner_json = args.results_dir / "lanner-load.json"
    if not args.skip_baseline:
        cmd, label = baseline_command(args, model_dir)
        baseline_json = run_against("baseline-load", label, cmd, "/health", args.baseline_port, args.baseline_levels,
                                    args)
    if not args.skip_lanner:
        cmd = [py, "-m", "app", "serve", "--model", str(model_dir), "--model-id", args.model_id,
               "--port", str(args.port), "--max-num-seqs", str(args.max_num_seqs), *args.lanner_arg]
        compare = baseline_json if baseline_json.exists() else None
        lanner_json = run_against("lanner-load", "lanner", cmd, "/ready", args.port, args.levels, args, compare)
    if not baseline_json.exists():  # --skip-baseline with no earlier baseline run: Lanner's own report only
        log(f"no {baseline_json}: no comparison written")
        return 0
    lanner, baseline = (json.loads(p.read_text(encoding="utf-8")) for p in (lanner_json, baseline_json))
    md = args.results_dir / "load-comparison.md"
    md.write_text(comparison_markdown(lanner, baseline), encoding="utf-8")
    plot_results([lanner, baseline], args.results_dir / "load-comparison.png",
                 title=f"{lanner['name']} vs {baseline['name']} ({model_dir.name}, {os.cpu_count()} CPUs)")
    log(f"wrote {md} and {md.with_suffix('.png')}")
    print(md.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
