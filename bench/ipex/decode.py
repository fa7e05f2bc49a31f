"""Single-stream (and small-batch) decode speed of the WOQ backends on one random-weight Llama.

    python bench/ipex/decode.py --out bench/results/ipex                 # what scripts/ipex-env.sh runs
    python bench/ipex/decode.py --configs fp32,native:int8,torchao:int8  # any backend:mode[:lowp] list

The model has TinyLlama-1.1B's layer shape (hidden 2048, 32 heads, 4 KV heads, intermediate 5632, vocab
32000) with --layers decoder layers (default 4, not 22: the fp32 file is 1.1 GB instead of 4.4 GB and is
built in seconds; per-layer cost is the 1.1B model's, the head and embedding are full size).  Built once,
with bench/make_models.py's recipe (demo tokenizer, N(0, 0.02) weights, peaked head), into
~/.cache/lanner/bench-models/tinyllama-shape-<L>l.

Each config is loaded through `load_runner` (the server's path: quantized while read, the backend's modules
swapped in), prefilled with a --prompt-token prompt per sequence, then timed over --steps decode steps
after --warmup untimed ones, --repeats times; the median step time is reported as ms/token (batch 1) and
tokens/s (batch x steps / time).  A config whose backend cannot run in this environment is recorded as
skipped with the reason.  `backend:mode:lowp` sets LANNER_IPEX_LOWP_MODE for IPEX (none|fp16|bf16|int8).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from app.models.base import StepInput  # noqa: E402
from app.models.loader import ModelLoadError, inspect_model_dir  # noqa: E402
from app.models.runner import load_runner  # noqa: E402
from app.quant.isa import detect_isa  # noqa: E402
from bench import make_models as mm  # noqa: E402

DEFAULT_CONFIGS = "fp32,native:int8,ipex:int8,ipex:int8:none,ipex:int8:int8,native:int4,ipex:int4"


def ensure_model(layers: int, out_dir: Path) -> Path:
    recipe = mm.Recipe(name=f"tinyllama-shape-{layers}l", build_version=mm.BUILD_VERSION,
                       seed=mm.SEEDS["tinyllama-1.1b"], num_layers=layers)
    target = out_dir / recipe.name
    if not mm.is_current(target, recipe):
        mm.write_model_dir(recipe, target)
    return target


def parse_config(text: str) -> tuple[str, str, str | None]:
    parts = text.split(":")
    if parts[0] == "fp32":
        return "native", "none", None
    backend, mode = parts[0], parts[1]
    return backend, mode, parts[2] if len(parts) > 2 else None


def bench_config(info, backend: str, mode: str, lowp: str | None, batch: int, args) -> dict:
    if lowp is not None:
        os.environ["LANNER_IPEX_LOWP_MODE"] = lowp
    else:
        os.environ.pop("LANNER_IPEX_LOWP_MODE", None)
    t0 = time.perf_counter()
    try:
        runner = load_runner(info, args.prompt_tokens + args.warmup + args.steps + 8, batch, quantize=mode,
                             woq_backend=backend)
    except ModelLoadError as exc:
        return {"skipped": str(exc)}
    load_s = time.perf_counter() - t0
    vocab = info.config.vocab_size
    times = []
    with torch.inference_mode():
        for r in range(args.repeats):
            seqs = [r * batch + b for b in range(batch)]
            prompts = [[(7 + 13 * s + 31 * i) % 5000 + 10 for i in range(args.prompt_tokens)] for s in seqs]
            logits = runner.step([StepInput(s, p, 0) for s, p in zip(seqs, prompts)])
            pos = args.prompt_tokens
            step_times = []
            for t in range(args.warmup + args.steps):
                nxt = logits.argmax(-1).tolist()
                t1 = time.perf_counter()
                logits = runner.step([StepInput(s, [nxt[i] % vocab], pos) for i, s in enumerate(seqs)])
                dt = time.perf_counter() - t1
                pos += 1
                if t >= args.warmup:
                    step_times.append(dt)
            for s in seqs:
                runner.free(s)
            times.append(sum(step_times) / len(step_times))
    step = statistics.median(times)
    report = runner.quant_report
    del runner
    gc.collect()
    return {"load_s": round(load_s, 2), "ms_per_step": round(step * 1e3, 2),
            "tokens_per_s": round(batch / step, 2), "step_ms_repeats": [round(t * 1e3, 2) for t in times],
            "backend": report.backend, "mode": report.mode, "kernel": report.kernel,
            "weights_mib": round(report.bytes_after / 2**20, 1) if report.mode != "none" else None}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("intel-extension-for-pytorch", "torchao", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores_visible": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "isa": detect_isa().describe()}


def write_markdown(result: dict, path: Path) -> None:
    rows = ["| config | batch | ms/step | tokens/s | x fp32 | load s | weights MiB | kernel |",
            "|---|---|---|---|---|---|---|---|"]
    base = {r["batch"]: r for r in result["runs"] if r["config"] == "fp32" and "tokens_per_s" in r}
    for r in result["runs"]:
        if "skipped" in r:
            rows.append(f"| {r['config']} | {r['batch']} | skipped | | | | | {r['skipped'][:140]} |")
            continue
        ref = base.get(r["batch"])
        speedup = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else ""
        rows.append(f"| {r['config']} | {r['batch']} | {r['ms_per_step']} | {r['tokens_per_s']} | "
                    f"{speedup} | {r['load_s']} | {r['weights_mib'] or ''} | {r['kernel']} |")
    m, v = result["machine"], result["versions"]
    head = (f"# WOQ backends, decode speed\n\n{result['model']}\n\n"
            f"Machine: {m['cpu']}, {m['cores_visible']} cores visible, {m['torch_threads']} torch threads; "
            f"{m['isa']}.\nVersions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".\n\n"
            f"Prompt {result['args']['prompt_tokens']} tokens, {result['args']['warmup']} warm-up + "
            f"{result['args']['steps']} timed decode steps, "
            f"median of {result['args']['repeats']} repeats.\n\n")
    path.write_text(head + "\n".join(rows) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated (default {DEFAULT_CONFIGS})")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (sequences decoded together)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models-dir", type=Path, default=mm.DEFAULT_OUT)
    p.add_argument("--out", type=Path, default=None, help="write decode.json and decode.md here")
    p.add_argument("--name", default="decode", help="file name stem of the results")
    args = p.parse_args(argv)
    path = ensure_model(args.layers, args.models_dir)
    info = inspect_model_dir(path)
    runs = []
    for batch in (int(b) for b in args.batch.split(",")):
        for text in args.configs.split(","):
            backend, mode, lowp = parse_config(text)
            r = {"config": text, "batch": batch, **bench_config(info, backend, mode, lowp, batch, args)}
            print(json.dumps(r), flush=True)
            runs.append(r)
    gib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    result = {"model": f"Random-weight Llama, TinyLlama-1.1B layer shape with {args.layers} layers "
                       f"({path.name}, fp32 {gib:.2f} GiB)",
              "machine": machine(), "versions": versions(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "runs": runs}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        write_markdown(result, args.out / f"{args.name}.md")
        print(f"wrote {args.out / (args.name + '.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
