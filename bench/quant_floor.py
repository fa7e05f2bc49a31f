"""How close can any quantizer of a given size get to fp32 logits, on random and on trained weights?

Every Linear of the fp32 model (Lanner's batched runner, the weights as loaded) is replaced by a fake-quantized
fp32 copy: the activations stay exact fp32, so the result is the floor of the weight format alone, below what
any kernel (whose activations are rounded too) can give.  Formats: int8 per output channel (the issue's int8),
int8 per 32 weights (llama.cpp Q8_0's blocks), int4 in asymmetric groups of 32 (round to nearest), int4-sized
and int8-sized white noise (each matrix plus Gaussian noise of the same Frobenius norm as that format's error),
and noise scaled to a few more error levels, which traces 1 - cosine against the weights' relative error.

The inputs are test_woq_accuracy's: 8 prompts, then 6 teacher-forced decode steps each (56 logit rows).

Models: the random-weight bench models (bench/make_models.py, e.g. tinyllama-1.1b) and the models trained
here on the bundled corpus (bench/train_models.py: trained-llama, trained-falcon, trained-llama-deep), each
with its untrained twin `untrained-<name>` (the same seeded init at step 0), so training's effect is measured
against a baseline of the same shape in the same run; or any model directory (a real checkpoint, where one
can be had):

    python bench/quant_floor.py [--model tinyllama-1.1b ...] [--out bench/results/quant-floor]

Writes <model>.json, <model>.md and <model>.png (1 - cosine against relative error, log-log).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.models.loader import inspect_model_dir, load_tokenizer  # noqa: E402
from app.models.runner import load_runner  # noqa: E402
from bench.loadgen import machine_info  # noqa: E402
from bench.make_models import DEFAULT_OUT, MODEL_NAMES, ensure_model  # noqa: E402
from bench.train_models import RECIPES, ensure_trained  # noqa: E402
from tests.model.test_woq_accuracy import MAX_LEN, compare, context_share, logit_rows, prompt_ids  # noqa: E402

TINY = 1e-12


def int8_channel(w: torch.Tensor) -> torch.Tensor:
    s = (w.abs().amax(1, keepdim=True) / 127).clamp_min(TINY)
    return (w / s).round().clamp(-127, 127) * s


def int8_blocks(w: torch.Tensor, g: int = 32) -> torch.Tensor:
    n, k = w.shape
    x = w.reshape(n, k // g, g)
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(TINY)
    return ((x / s).round().clamp(-127, 127) * s).reshape(n, k)


def int4_groups(w: torch.Tensor, g: int = 32) -> torch.Tensor:
    n, k = w.shape
    x = w.reshape(n, k // g, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(TINY)
    z = (-lo / s).round()
    return (((x / s).round() + z).clamp(0, 15) - z).mul(s).reshape(n, k)


def white_noise(seed: int, rel: float | None = None, like=None):
    """w + Gaussian noise: of relative size `rel`, or of the size of `like`'s error on this matrix."""
    gen = torch.Generator().manual_seed(seed)

    def apply(w: torch.Tensor) -> torch.Tensor:
        size = (like(w) - w).pow(2).mean().sqrt() if like else w.pow(2).mean().sqrt() * rel
        return w + torch.randn(w.shape, generator=gen) * size
    return apply


# label -> a function making the format's weight transform; the noise transforms are made afresh for each
# model, so their draws do not depend on which models were measured before in the same process
FORMATS = {
    "int8 per output channel": lambda: int8_channel,
    "int8 per 32 weights": lambda: int8_blocks,
    "int4 groups of 32 (RTN)": lambda: int4_groups,
    "noise of int8-per-channel's size": lambda: white_noise(1, like=int8_channel),
    "noise of int4-g32's size": lambda: white_noise(2, like=int4_groups),
    **{f"noise {p}%": (lambda p=p: white_noise(p, rel=p / 100)) for p in (2, 4)},  # independent draws
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["tinyllama-1.1b"],
                    help="bench models (make_models.py), trained ones and their untrained- twins (train_models.py), "
                         "or model directories")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant-floor")
    args = ap.parse_args()
    for model in args.model:
        if model in RECIPES:
            path = ensure_trained(model, progress=print)
        elif model in MODEL_NAMES:
            path = ensure_model(model, DEFAULT_OUT)[0]
        elif Path(model).is_dir():  # any model directory, e.g. a real checkpoint; results never overwrite ours
            path, model = Path(model), f"dir-{Path(model).name}"
        else:
            ap.error(f"{model}: not a bench model ({', '.join(MODEL_NAMES)}), a trained one "
                     f"({', '.join(RECIPES)}) or a model directory")
        write(args.out, model, measure(path))
    return 0


def measure(path: Path) -> list[dict]:
    """One row per FORMATS entry: relative weight error and the logit statistics against fp32."""
    info = inspect_model_dir(path)
    prompts = prompt_ids(load_tokenizer(info.path), info.config.vocab_size)
    runner = load_runner(info, MAX_LEN, 1)
    ref, greedy = logit_rows(runner, prompts, None)
    share = context_share(ref)
    linears = {n: m for n, m in runner.model.named_modules() if isinstance(m, torch.nn.Linear)}
    orig = {n: m.weight.data.clone() for n, m in linears.items()}
    rows = []
    for label, make in FORMATS.items():
        fn = make()
        t0 = time.perf_counter()
        num = den = 0.0
        for n, m in linears.items():
            q = fn(orig[n])
            num += (q - orig[n]).pow(2).sum().item()
            den += orig[n].pow(2).sum().item()
            m.weight.data.copy_(q)
        stats = compare(ref, logit_rows(runner, prompts, greedy)[0])
        rows.append({"format": label, "rel_error": math.sqrt(num / den), **stats, "context_share": share})
        stats = "  ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k not in ("format", "rel_error"))
        print(f"{label:34s} error {rows[-1]['rel_error'] * 100:5.2f}%  {stats}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return rows


def write(out: Path, model: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (out / f"{model}.json").write_text(json.dumps({"model": model, "machine": machine, "rows": rows}, indent=2)
                                       + "\n")
    # 1 - cosine ~ c * error^2: fitted on the noise rows, the error one would need for a cosine of 0.99 / 0.999
    noise = [r for r in rows if r["format"].startswith("noise")]
    c = sum((1 - r["mean_cos"]) / r["rel_error"] ** 2 for r in noise) / len(noise)
    need = {t: math.sqrt((1 - t) / c) for t in (0.99, 0.999)}
    lines = [f"# Weight-format floors on {model} (fp32 activations, weights fake-quantized)", "",
             f"Machine: {machine['cpu_model']}, torch {machine['torch']}, commit {machine['git_commit']}.", "",
             "Inputs: test_woq_accuracy's 8 prompts, then 6 teacher-forced decode steps each; cosine of logit rows "
             "against the fp32 model. Context cos: the cosine of the prompt-dependent part alone (rows centred over "
             f"the vocabulary, minus fp32's mean row), which is {rows[0]['context_share']:.1%} of fp32's centred "
             "logit energy here. KL: mean KL divergence of the next-token distribution from fp32's (nats). Every "
             "Linear is fake-quantized, the output head included (Lanner's int4 keeps the head int8 by default).",
             "", "| weights | relative error | mean cos | min cos | context cos | KL | top-1 | top-1 in fp32's top-2 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['rel_error'] * 100:.2f}% | {r['mean_cos']:.5f} | {r['min_cos']:.5f} | "
              f"{r['context_cos']:.5f} | {r['kl']:.2e} | {r['top1']:.2f} | {r['top1_in_ref_top2']:.2f} |"
              for r in rows]
    lines += ["", f"1 - cosine follows c x error^2 with c = {c:.3g} (mean over the noise rows). A mean cosine of 0.99 "
              f"needs {need[0.99] * 100:.2f}% relative error per matrix, 0.999 needs {need[0.999] * 100:.2f}%. "
              "At the rate-distortion bound of Gaussian weights (error 2^-R at R bits per weight) that is "
              f"R >= {max(0.0, math.log2(1 / need[0.99])):.1f} and {max(0.0, math.log2(1 / need[0.999])):.1f} "
              "bits per weight."]
    (out / f"{model}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.scatter(r["rel_error"] * 100, 1 - r["mean_cos"], label=r["format"])
    xs = [0.3, 10]
    ax.plot(xs, [c * (x / 100) ** 2 for x in xs], "k--", lw=0.8, label=f"{c:.3g} x error^2")
    for t in (0.99, 0.999):
        ax.axhline(1 - t, color="grey", lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="relative weight error per matrix (%)",
           ylabel="1 - mean logit cosine vs fp32", title=f"{model}: weight error -> logit error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{model}.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
