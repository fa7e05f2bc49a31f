"""lm-evaluation-harness against Lanner, checked against lm-eval's own transformers backend on the same weights.

    .venv/bin/python bench/lm_eval_check.py                   # demo-llama and demo-falcon; takes the CPU lock
    .venv/bin/python bench/lm_eval_check.py --models demo-llama --tol 1e-3

What runs
---------
The real `lm_eval` CLI, from its own venv (`--lm-eval-venv`, default ~/.cache/lanner/lm-eval-venv, built
with `pip install 'lm_eval[hf,api]' torch==2.13.0`), offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1), on two
local tasks in bench/lm_eval/tasks (`--include_path`): `lanner_facts` (32 four-way multiple-choice
questions: 128 `loglikelihood` requests) and `lanner_paragraphs` (six short paragraphs: prose, French,
code; `loglikelihood_rolling`). For each demo model, twice:

* api: `lanner serve` (the demo models, built into the default cache if missing) on a free loopback
  port, and `--model local-completions` with `base_url=http://127.0.0.1:PORT/v1/completions`,
  `tokenizer=<the model's directory>,tokenizer_backend=huggingface,tokenized_requests=True,
  num_concurrent=4`: lm-eval tokenizes and sends token-id prompts with `echo: true, logprobs: 1,
  max_tokens: 1, temperature: 0` and reads `token_logprobs`/`top_logprobs` of the echoed prompt.
* hf: `--model hf --model_args pretrained=<the model's directory>,dtype=float32` (transformers on the
  same files).

Both get `add_bos_token=True` and `max_length=1024` (the demo models' context), so that both backends
tokenize identically: by default lm-eval's API models encode without BOS while its hf model uses the
tokenizer's default (which adds BOS for these models), which would be two different inputs.

Then the per-sample `filtered_resps` of the two `--log_samples` files are matched by task, doc and
choice: every loglikelihood must agree within `--tol` (absolute), every multiple-choice `is_greedy` and
every per-doc prediction must be equal, and so must the aggregate metrics. Output: a table on stdout and
`<results-dir>/lm-eval-check.{json,md}`; lm-eval's raw output and the logs go to `--work-dir`. The exit
code is 1 on any mismatch (or a failed run).

CPU lock: unless LANNER_CPU_LOCK is set to an empty string, the whole check holds an exclusive flock on
LANNER_CPU_LOCK (default /tmp/lanner-cpu.lock), the same lock `flock(1)` takes, so run it bare; inside
`flock /tmp/lanner-cpu.lock ...` set LANNER_CPU_LOCK= or it waits for itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TASKS_DIR = REPO_ROOT / "bench" / "lm_eval" / "tasks"
DEFAULT_TASKS = "lanner_facts,lanner_paragraphs"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lanner"


def log(msg: str) -> None:
    print(f"lm-eval-check: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_model_dirs() -> dict[str, Path]:
    from app.config import default_cache_dir
    from app.models.demo import ensure_demo_models

    return ensure_demo_models(default_cache_dir() / "demo-models")


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    return env


class Server:
    """`lanner serve` (demo models) on a free loopback port, logging to a file."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        cmd = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        log(f"starting {' '.join(cmd)} (log: {self.log_path})")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=offline_env(), start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lanner serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"lanner serve not ready after 300 s; see {self.log_path}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run_lm_eval(lm_eval: Path, backend: str, model_args: dict[str, Any], tasks: str, out_dir: Path,
                extra: list[str], log_path: Path) -> float:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [str(lm_eval), "--model", backend, "--model_args", args, "--tasks", tasks,
           "--include_path", str(TASKS_DIR.relative_to(REPO_ROOT)), "--log_samples",
           "--output_path", str(out_dir), "--seed", "1234", *extra]
    log(f"running {shlex.join(cmd)} (log: {log_path})")
    t0 = time.monotonic()
    with open(log_path, "w") as f:
        f.write(shlex.join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, env=offline_env()).returncode
    elapsed = time.monotonic() - t0
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"lm_eval ({backend}) exited with {rc} after {elapsed:.0f} s; last lines of "
                           f"{log_path}:\n{tail}")
    return elapsed


def read_run(out_dir: Path) -> tuple[dict[str, Any], dict[str, dict[int, dict[str, Any]]]]:
    """(results json, {task: {doc_id: sample}}) of one lm_eval --output_path (one model, one run)."""
    results = sorted(out_dir.rglob("results_*.json"))
    if len(results) != 1:
        raise RuntimeError(f"expected one results_*.json under {out_dir}, found {len(results)}")
    res = json.loads(results[0].read_text())
    samples: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(out_dir.rglob("samples_*.jsonl")):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        docs = samples.setdefault(task, {})
        for line in path.read_text().splitlines():
            if line.strip():
                s = json.loads(line)
                docs[s["doc_id"]] = s
    return res, samples


def _entries(sample: dict[str, Any]) -> list[tuple[float, bool | None]]:
    """(loglikelihood, is_greedy or None) per request of a sample, from filtered_resps."""
    out = []
    for r in sample["filtered_resps"]:
        if isinstance(r, (list, tuple)):
            out.append((float(r[0]), bool(r[1]) if len(r) > 1 else None))
        else:
            out.append((float(r), None))
    return out


def _prediction(sample: dict[str, Any]) -> int | None:
    lls = [ll for ll, _ in _entries(sample)]
    return max(range(len(lls)), key=lls.__getitem__) if len(lls) > 1 else None


def compare(api: tuple[dict, dict], hf: tuple[dict, dict], tol: float) -> dict[str, Any]:
    api_res, api_samples = api
    hf_res, hf_samples = hf
    problems: list[str] = []
    tasks: dict[str, Any] = {}
    if set(api_samples) != set(hf_samples):
        problems.append(f"different tasks logged: api {sorted(api_samples)} vs hf {sorted(hf_samples)}")
    for task in sorted(set(api_samples) & set(hf_samples)):
        a_docs, h_docs = api_samples[task], hf_samples[task]
        if set(a_docs) != set(h_docs):
            problems.append(f"{task}: different doc ids")
        diffs, n_greedy_diff, n_pred_diff, n_args_diff = [], 0, 0, 0
        worst: dict[str, Any] | None = None
        for doc_id in sorted(set(a_docs) & set(h_docs)):
            a, h = a_docs[doc_id], h_docs[doc_id]
            if a.get("arguments") != h.get("arguments"):
                n_args_diff += 1
            ae, he = _entries(a), _entries(h)
            if len(ae) != len(he):
                problems.append(f"{task} doc {doc_id}: {len(ae)} vs {len(he)} responses")
                continue
            for i, ((all_, ag), (hll, hg)) in enumerate(zip(ae, he)):
                d = abs(all_ - hll) if math.isfinite(all_) and math.isfinite(hll) else math.inf
                diffs.append(d)
                if worst is None or d > worst["abs_diff"]:
                    worst = {"doc_id": doc_id, "request": i, "api": all_, "hf": hll, "abs_diff": d}
                if d > tol:
                    problems.append(f"{task} doc {doc_id} request {i}: api {all_!r} vs hf {hll!r} (|diff| {d:.3g})")
                if ag is not None and hg is not None and ag != hg:
                    n_greedy_diff += 1
            if _prediction(a) != _prediction(h):
                n_pred_diff += 1
        if n_args_diff:
            problems.append(f"{task}: {n_args_diff} docs with different request arguments")
        if n_greedy_diff:
            problems.append(f"{task}: is_greedy differs in {n_greedy_diff} requests")
        if n_pred_diff:
            problems.append(f"{task}: the chosen answer differs in {n_pred_diff} docs")
        metrics = {}
        for key, hv in sorted(hf_res["results"].get(task, {}).items()):
            if key == "alias" or "stderr" in key or not isinstance(hv, (int, float)):
                continue
            av = api_res["results"].get(task, {}).get(key)
            metrics[key] = {"api": av, "hf": hv}
            if av is None or (key.startswith("acc") and av != hv) or \
                    (not key.startswith("acc") and not math.isclose(av, hv, rel_tol=1e-4)):
                problems.append(f"{task} {key}: api {av!r} vs hf {hv!r}")
        tasks[task] = {
            "docs": len(set(a_docs) & set(h_docs)),
            "requests": len(diffs),
            "max_abs_diff": max(diffs) if diffs else None,
            "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None,
            "worst": worst,
            "is_greedy_mismatches": n_greedy_diff,
            "prediction_mismatches": n_pred_diff,
            "metrics": metrics,
        }
    return {"tasks": tasks, "problems": problems, "ok": not problems}


def lm_eval_versions(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['lm_eval', 'torch', 'transformers', 'datasets']}))")
    try:
        return json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                                         text=True, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        return {}


def fmt(v: Any, spec: str = ".6g") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# lm-eval-harness against Lanner",
        "",
        f"{report['date']} · lm_eval {report['versions'].get('lm_eval', '?')} · torch "
        f"{report['versions'].get('torch', '?')} · transformers {report['versions'].get('transformers', '?')} · "
        f"tolerance {report['tol']:g} · {'**all agree**' if report['ok'] else '**MISMATCH**'}",
        "",
        "Generated by `bench/lm_eval_check.py`: the same lm-eval tasks (bench/lm_eval/tasks) run through "
        "`local-completions` against `lanner serve` (api) and through lm-eval's `hf` backend (transformers, "
        "float32) on the same model directory (hf); per-request loglikelihoods compared.",
        "",
        "| model | task | docs | requests | metric | api (Lanner) | hf (transformers) | max abs Δ loglik | mean abs Δ | is_greedy / answer mismatches |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, m in report["models"].items():
        for task, t in m["comparison"]["tasks"].items():
            metrics = t["metrics"] or {"—": {"api": None, "hf": None}}
            for j, (name, v) in enumerate(metrics.items()):
                head = (f"| {model} | {task} | {t['docs']} | {t['requests']} | " if j == 0 else "| | | | | ")
                tail = (f"{fmt(t['max_abs_diff'], '.2e')} | {fmt(t['mean_abs_diff'], '.2e')} | "
                        f"{t['is_greedy_mismatches']} / {t['prediction_mismatches']} |" if j == 0 else "| | |")
                lines.append(f"{head}{name} | {fmt(v['api'], '.7g')} | {fmt(v['hf'], '.7g')} | {tail}")
    lines += ["", "Run times (s): " + ", ".join(
        f"{model} api {m['seconds']['api']:.0f} / hf {m['seconds']['hf']:.0f}" for model, m in report["models"].items())]
    lines += ["", "Commands:", ""]
    for model, m in report["models"].items():
        lines += [f"- `{c}`" for c in m["commands"].values()]
    problems = [f"{model}: {p}" for model, m in report["models"].items() for p in m["comparison"]["problems"]]
    lines += ["", "Problems:" if problems else "No problems.", ""]
    lines += [f"- {p}" for p in problems[:50]]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", default="demo-llama,demo-falcon")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--lm-eval-venv", type=Path,
                    default=Path(os.environ.get("LANNER_LM_EVAL_VENV", CACHE / "lm-eval-venv")))
    ap.add_argument("--num-concurrent", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--hf-batch-size", default="8")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--results-dir", type=Path, default=REPO_ROOT / "bench" / "results" / "lm-eval")
    ap.add_argument("--work-dir", type=Path, default=CACHE / "lm-eval-runs")
    args = ap.parse_args()

    lm_eval = args.lm_eval_venv / "bin" / "lm_eval"
    if not lm_eval.exists():
        log(f"no lm_eval at {lm_eval}; build the venv first:\n  python3 -m venv {args.lm_eval_venv} && "
            f"{args.lm_eval_venv}/bin/pip install 'lm_eval[hf,api]' torch==2.13.0")
        return 2

    lock_path = os.environ.get("LANNER_CPU_LOCK", "/tmp/lanner-cpu.lock")
    lock_file = None
    if lock_path:
        lock_file = open(lock_path, "a")
        log(f"waiting for the CPU lock {lock_path}")
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        log("got the CPU lock")

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = args.work_dir / stamp
    work.mkdir(parents=True, exist_ok=True)
    dirs = demo_model_dirs()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in dirs:
            log(f"unknown model {m!r}; demo models: {', '.join(dirs)}")
            return 2

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": args.tasks, "tol": args.tol, "versions": lm_eval_versions(args.lm_eval_venv),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "work_dir": str(work), "models": {},
    }
    failed = False
    with Server(work / "lanner-serve.log") as server:
        base_url = f"http://127.0.0.1:{server.port}/v1/completions"
        for model in models:
            mdir = dirs[model]
            common = {"add_bos_token": True, "max_length": args.max_length}
            api_args = {"model": model, "base_url": base_url, "tokenizer": mdir, "tokenizer_backend": "huggingface",
                        "tokenized_requests": True, "num_concurrent": args.num_concurrent, **common}
            hf_args = {"pretrained": mdir, "dtype": "float32", **common}
            entry: dict[str, Any] = {"model_dir": str(mdir), "seconds": {}, "commands": {}}
            outs = {}
            for backend, margs, extra in (("api", api_args, []),
                                          ("hf", hf_args, ["--device", "cpu", "--batch_size", args.hf_batch_size])):
                out = work / model / backend
                name = "local-completions" if backend == "api" else "hf"
                entry["commands"][backend] = shlex.join(
                    ["lm_eval", "--model", name, "--model_args", ",".join(f"{k}={v}" for k, v in margs.items()),
                     "--tasks", args.tasks, "--include_path", "bench/lm_eval/tasks", "--log_samples",
                     "--output_path", "OUT", *extra]).replace(str(mdir), f"<{model} dir>").replace(
                         f":{server.port}/", ":PORT/")
                try:
                    entry["seconds"][backend] = run_lm_eval(lm_eval, name, margs, args.tasks, out, extra,
                                                            work / f"{model}-{backend}.log")
                    outs[backend] = read_run(out)
                except RuntimeError as exc:
                    log(str(exc))
                    entry["error"] = str(exc)
                    failed = True
                    break
            if len(outs) == 2:
                entry["comparison"] = compare(outs["api"], outs["hf"], args.tol)
                failed |= not entry["comparison"]["ok"]
            else:
                entry["comparison"] = {"tasks": {}, "problems": [entry.get("error", "run failed")], "ok": False}
                entry["seconds"].setdefault("api", math.nan)
                entry["seconds"].setdefault("hf", math.nan)
            report["models"][model] = entry
    report["ok"] = not failed

    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "lm-eval-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = markdown(report)
    (args.results_dir / "lm-eval-check.md").write_text(md)
    print(md)
    log(f"wrote {args.results_dir}/lm-eval-check.{{json,md}}; raw lm-eval output in {work}")
    if lock_file:
        lock_file.close()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
