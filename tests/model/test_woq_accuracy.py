"""Weight-only-quantized models against their fp32 selves, through the real `load_runner` path.

The issue's targets (mean logit cosine >= 0.999 for int8, >= 0.99 for int4) are asserted on trained weights:
`test_trained_models_meet_the_targets` quantizes a Llama and a Falcon trained here on the bundled corpus
(bench/train_models.py), at load and as a `lanner quantize` checkpoint served by the lite runner.  The rest of
this module runs the random-weight models, whose bounds sit lower for the reasons below: random weights are
the worst case for weight-only quantization, not a sample of it.

Each model (the two demo models and the tiny parity models of every layout) is loaded twice, fp32 and
quantized, and both runners are fed the same tokens: a fixed set of 8 prompts (one prefill each), then 6
teacher-forced decode steps on the fp32 model's greedy tokens. Over all those logit rows we require:

    int8: per model mean cosine >= 0.999 (min row >= 0.995), our top-1 within fp32's top-2 >= 0.98;
          top-1 agreement >= 0.9 on the demo models and pooled over all models.
    int4: per model mean cosine >= 0.972 (min row >= 0.93), top-1 within fp32's top-2 >= 0.85;
          top-1 agreement >= 0.65 on the demo models, >= 0.8 pooled.

Measured (torch 2.13, AVX2): int8 mean cosine 0.9998-1.0000, top-1 0.875-1.0 (the misses are near-ties:
fp32 top-2 margins of 0.007-0.1 on a logit std of 5), pooled 0.97-0.98.  int4 (group 32, head int8,
integer zero points, 8-bit scale codes) mean cosine 0.9741 (demo-llama, min row 0.931), 0.9836
(llama3-rope), 0.9881-0.9978 (the others), pooled top-1 0.81.  With a bf16 scale per group (checkpoint
format 3, 4.625 bits per weight instead of 4.375) it was 0.9742 (min 0.937) / 0.9835 / 0.9882-0.9979,
pooled 0.82; with bf16 float zero points too (format 1, 5 bits per weight) 0.9761 (min 0.95) / 0.9839 /
0.9895-0.9980, pooled 0.83; with group 64 and float zeros 0.9737 / 0.9716 / 0.9845-0.9973, pooled 0.80.
The 1.1B shape (`test_tinyllama_shape`, slow): int8 0.997, int4 0.866 (0.867 with bf16 scales, 0.868
with float zeros; group 128: 0.825).

The issue's int4 target of 0.99 is not met on these random-weight models, and cannot be by a better
4-bit grid: the quantization error here behaves exactly like white noise.  Replacing every int4 matrix
by its fp32 original plus Gaussian noise of the same Frobenius norm as its int4 error gives the same
cosines (demo-llama 0.9791 vs 0.9761, falcon-7b 0.9887 vs 0.9904, ...; on the 1.1B shape 0.8724 vs
0.868, and noise the size of int8's error 0.9982 vs int8's 0.9981), and the losses of the layer kinds add
up (demo-llama, only one kind int4: qkv 0.9912, o 0.9928, gate_up 0.9923; all: 0.9761).
Gaussian weights have no outliers for clipping or grouping to exploit: the best grid we found (more range
ratios and shifts plus a least-squares refit) cut the per-matrix error from 7.6% to 7.0% and moved the
cosine by +0.001-0.002.  0.99 on demo-llama would need ~4.9% error per matrix (1 - cosine grows with the
squared error), far below what 16 levels give on Gaussian data: 7.0% at best in groups of 32 here, 9.7%
for Lloyd-Max's optimal non-uniform 16 levels over a whole Gaussian.  What decides the cosine
is how much the random model amplifies noise: the peaked heads (logit std 10) and the large init
(std 0.08 at hidden 64) of the tiny models, and depth in the 22-layer 1.1B shape, where even int8's
~1% error per matrix ends at 0.998.  Trained models are far less sensitive: the same shapes trained here
(bench/train_models.py) meet the targets with a wide margin (`test_trained_models_meet_the_targets`).

On the 1.1B shape with every Linear fake-quantized in fp32 (exact activations; bench/quant_floor.py,
bench/results/quant-floor/): int8 per output channel 0.83% relative error -> cosine 0.9983; int8 per 32
weights 0.53% -> 0.9992; int4 groups of 32 (RTN) 8.1% -> 0.853; white noise of int4's size 0.851.  1 - cosine
goes as 25 x the squared error (noise of 0.83%, 2%, 4% and 8.1%), so 0.99 needs 2.0% error per matrix: at the
rate-distortion bound of Gaussian weights (error 2^-R at R bits per weight) that is R >= 5.6, beyond any 4-bit
code.  The issue's int8 format (per output channel) stops at 0.9983 with exact activations, under the 0.999
target; Lanner's 8-bit activation blocks add the rest (0.997).

The demo models have hidden size 64, so every int4 group is 32 wide (demo-llama's down_proj, K=176, has no
valid group size and stays int8).  int8 and int4 layers run Lanner's own kernels for every M when they
build (app/quant/kernels.py; the default here); with ATen's kernels, prefill rows go through the
dequant+sgemm path when the prompt has >= CROSSOVER_M tokens and through the packed kernels otherwise.
`test_both_paths_agree` forces each path with LANNER_WOQ_KERNEL so all of them are covered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.engine.process import WorkerConfig, build_runner
from app.lite.runner import load_lite_runner
from app.models.base import StepInput
from app.models.demo import DEMO_MODEL_IDS
from app.models.loader import inspect_model_dir, load_tokenizer
from app.models.runner import load_runner
from app.quant import kernels
from app.quant.checkpoint import quantize_checkpoint
from app.quant.woq import KERNEL_ENV, Int4Linear, Int8Linear, TiledInt4Linear, TiledInt8Linear
from bench.train_models import MARKER_FILE as TRAINED_MARKER
from bench.train_models import TESTED as TRAINED_MODELS
from bench.train_models import ensure_trained
from tests.model.test_parity import save_parity_models

MAX_LEN = 256
DECODE_STEPS = 6
PROMPTS = [
    "Hello, my name is",
    "The capital of France is a city where",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "猎隼和兰隼",
    "User: hi\nAssistant:",
    "Once upon a time, in a land far away, there lived a llama who loved to read about falcons, "
    "and every evening the llama climbed the hill to watch them fly over the valley",
    "🦙🦅 llamas and falcons",
    "Ελληνικά και русский",
]
# Per model (cosine of logit rows; how often our top-1 is one of fp32's two best tokens).
BOUNDS = {"int8": {"mean_cos": 0.999, "min_cos": 0.995, "top1_in_ref_top2": 0.98},
          "int4": {"mean_cos": 0.972, "min_cos": 0.93, "top1_in_ref_top2": 0.85}}
DEMO_TOP1 = {"int8": {"top1": 0.9}, "int4": {"top1": 0.65}}  # demo models: peaked logits, few near-ties
POOLED_TOP1 = {"int8": 0.9, "int4": 0.8}  # top-1 agreement over every row of every model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, demo_models_dir) -> dict[str, Path]:
    """name -> model directory: the demo models and the parity models (with the demo tokenizers)."""
    out = {m: demo_models_dir / m for m in DEMO_MODEL_IDS}
    out.update(save_parity_models(tmp_path_factory.mktemp("woq-models"), demo_models_dir))
    return out


def prompt_ids(tokenizer, vocab: int) -> list[list[int]]:
    return [[i % vocab for i in tokenizer(p)["input_ids"]] for p in PROMPTS]


def logit_rows(runner, prompts: list[list[int]], forced: list[list[int]] | None) -> tuple[torch.Tensor, list]:
    """Last-token logits of every prompt and of DECODE_STEPS decode steps (teacher-forced on `forced`,
    else greedy); returns (rows [P * (1 + steps), V], the tokens fed)."""
    rows, fed = [], []
    for s, ids in enumerate(prompts):
        logits = torch.as_tensor(runner.step([StepInput(s, ids, 0)])[0])  # the lite runner returns numpy
        rows.append(logits)
        tokens = []
        for t in range(DECODE_STEPS):
            nxt = forced[s][t] if forced is not None else int(logits.argmax())
            tokens.append(nxt)
            logits = torch.as_tensor(runner.step([StepInput(s, [nxt], len(ids) + t)])[0])
            rows.append(logits)
        runner.free(s)
        fed.append(tokens)
    return torch.stack(rows), fed


def compare(ref: torch.Tensor, ours: torch.Tensor) -> dict[str, float]:
    """Logit rows against fp32's: cosine (mean, min), top-1 agreement, our top-1 within fp32's top-2, the
    context cosine (below) and the mean KL divergence of our next-token distribution from fp32's."""
    cos = F.cosine_similarity(ref, ours, dim=-1)
    top1 = ours.argmax(-1)
    shared = softmax_centred(ref).mean(0)
    kl = F.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"mean_cos": cos.mean().item(), "min_cos": cos.min().item(),
            "top1": (ref.argmax(-1) == top1).float().mean().item(),
            "top1_in_ref_top2": (ref.topk(2, dim=-1).indices == top1[:, None]).any(-1).float().mean().item(),
            "context_cos": F.cosine_similarity(softmax_centred(ref) - shared, softmax_centred(ours) - shared,
                                               dim=-1).mean().item(),
            "kl": kl.mean().item()}


def softmax_centred(rows: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean over the vocabulary, which the softmax ignores."""
    return rows - rows.mean(-1, keepdim=True)


def context_share(ref: torch.Tensor) -> float:
    """How much of the rows' (softmax-centred) energy depends on the prompt: the part left after removing the
    mean row that every prompt shares.  A model that learned only token frequencies has ~0."""
    centred = softmax_centred(ref)
    return ((centred - centred.mean(0)).pow(2).sum() / centred.pow(2).sum()).item()


def missed(label: str, stats: dict[str, float], bounds: dict[str, float]) -> list[str]:
    """One line per statistic in `stats` below its lower bound in `bounds`."""
    return [f"{label}: {k}={stats[k]:.6f} < {bound}" for k, bound in bounds.items() if stats[k] < bound]


def bound_failures(name: str, mode: str, stats: dict[str, float]) -> list[str]:
    """The accuracy bounds (`BOUNDS`, plus `DEMO_TOP1` on the demo models) that `stats` miss."""
    return missed(name, stats, dict(BOUNDS[mode], **(DEMO_TOP1[mode] if name in DEMO_MODEL_IDS else {})))


def check_pooled(label: str, mode: str, lines: list[str], agree: list[torch.Tensor], failures: list[str]) -> None:
    """Print the per-model lines, then require the pooled top-1 agreement and no bound failures."""
    pooled = torch.cat(agree).mean().item()
    print("\n" + "\n".join(lines) + f"\n{label} pooled top-1 agreement {pooled:.4f}")
    assert pooled >= POOLED_TOP1[mode], f"pooled top-1 agreement {pooled:.4f}"
    assert not failures, failures


@pytest.fixture(scope="module")
def fp32_results(model_dirs) -> dict:
    """name -> (prompts, fp32 logit rows, fp32 greedy tokens)."""
    out = {}
    for name, d in model_dirs.items():
        info = inspect_model_dir(d)
        prompts = prompt_ids(load_tokenizer(info.path), info.config.vocab_size)
        runner = load_runner(info, MAX_LEN, 1)
        rows, greedy = logit_rows(runner, prompts, None)
        out[name] = (prompts, rows, greedy)
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_close_to_fp32(mode, model_dirs, fp32_results, monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    failures, lines, agree = [], [], []
    for name, d in model_dirs.items():
        prompts, ref, greedy = fp32_results[name]
        runner = load_runner(inspect_model_dir(d), MAX_LEN, 1, quantize=mode)
        assert runner.quant_report.mode == mode and runner.quant_report.num_swapped > 0
        ours, _ = logit_rows(runner, prompts, greedy)
        stats = compare(ref, ours)
        agree.append((ref.argmax(-1) == ours.argmax(-1)).float())
        lines.append(f"{mode} {name:24s} " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))
        failures += bound_failures(name, mode, stats)
    check_pooled(mode, mode, lines, agree, failures)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_both_paths_agree(mode, model_dirs, monkeypatch):
    """ATen's packed kernels (bf16 activations), dequant+sgemm (fp32) and Lanner's own kernels (activations
    quantized per 32-block) give the same logits up to their activation rounding."""
    info = inspect_model_dir(model_dirs["demo-llama"])
    prompts = prompt_ids(load_tokenizer(info.path), info.config.vocab_size)
    results, forced = {}, None
    paths = ("dequant", "packed", "lanner") if kernels.available() else ("dequant", "packed")
    for path in paths:  # the others are teacher-forced on dequant's greedy tokens
        monkeypatch.setenv(KERNEL_ENV, path)
        runner = load_runner(info, MAX_LEN, 1, quantize=mode)
        assert f"forced kernel={path}" in runner.quant_report.kernel
        results[path], forced = logit_rows(runner, prompts, forced)
    ref = results["dequant"]
    for path in paths[1:]:
        stats = compare(ref, results[path])
        assert stats["min_cos"] > 0.999 and stats["top1"] >= 0.9, (path, stats)
        # where the greedy token differs, it was a near-tie in dequant's logits: bf16 activations move each
        # logit by ~0.6% of the logits' spread (cosine 0.99998), so a flip is allowed only where dequant's
        # top-2 margin is under 5% of it (measured: 0.4-2%)
        rows = torch.nonzero(ref.argmax(-1) != results[path].argmax(-1)).flatten()
        margins = ref[rows, ref[rows].argmax(-1)] - ref[rows, results[path][rows].argmax(-1)]
        assert (margins < 0.05 * ref.std()).all(), (path, margins.tolist(), ref.std().item())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_server_path_greedy_decode(mode, model_dirs, monkeypatch):
    """The worker's own build path (WorkerConfig.quantize -> build_runner -> load_runner) then a batch of
    greedy decodes; every Linear is swapped, including the head."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    for model_id in DEMO_MODEL_IDS:
        info = inspect_model_dir(model_dirs[model_id])
        cfg = WorkerConfig(model_id=model_id, model_path=str(info.path), max_model_len=MAX_LEN,
                           max_num_seqs=4, max_num_batched_tokens=512, cpus=None, num_threads=None,
                           runner="batched", kv_cache_bytes=None, quantize=mode)
        runner = build_runner(cfg.runner, info, cfg.max_model_len, cfg.max_num_seqs, cfg.kv_cache_bytes,
                              cfg.quantize)
        kinds = {type(m) for m in runner.model.modules()}
        own = kernels.available()  # Lanner's kernels where they build, else ATen's
        kind = {"int8": TiledInt8Linear if own else Int8Linear, "int4": TiledInt4Linear if own else Int4Linear}
        assert torch.nn.Linear not in kinds and kind[mode] in kinds
        prompts = prompt_ids(load_tokenizer(info.path), info.config.vocab_size)[:4]
        logits = runner.step([StepInput(s, p, 0) for s, p in enumerate(prompts)])
        lengths = [len(p) for p in prompts]
        for t in range(8):
            nxt = logits.argmax(-1).tolist()
            logits = runner.step([StepInput(s, [nxt[s]], lengths[s] + t) for s in range(4)])
            assert logits.shape == (4, info.config.vocab_size) and torch.isfinite(logits).all()
    assert WorkerConfig.__dataclass_fields__["quantize"].default == "none"


# Trained weights (bench/train_models.py: trained-llama and trained-falcon, the demo tokenizers and the real
# layouts at hidden 256 with 4 layers, trained here for about a minute on the bundled corpus): the issue's own
# targets, on both ways a user gets a quantized model, quantize at load on the batched runner and a `lanner
# quantize` checkpoint on the torch-free lite runner (bf16 KV cache, its default).  `context_cos` (compare) is
# the cosine of the prompt-dependent part alone, so a large token-frequency vector shared by every row cannot
# carry the result; that part is 55% / 70% of these models' centred logit energy (TRAINED_MIN_CONTEXT guards
# it; a 1.1B shape trained here for 60 steps had 0.04% and was dropped).  Measured (both paths equal to 5
# digits): int8 mean cosine 0.99999 / 0.99998, context 0.99998 / 0.99997, top-1 1.0; int4 0.99993 / 0.99972,
# context 0.99981 / 0.99952, top-1 1.0 / 0.98, KL 0.0005 / 0.0015.  These are small models on a 48k-token
# corpus, one seed each, without the outlier features of large trained models: they show that the targets
# hold on trained weights and guard against regressions, not what a real 1.1B checkpoint gives
# (LANNER_ACCURACY_MODELS below measures that).
TRAINED_BOUNDS = {"int8": {"mean_cos": 0.999, "context_cos": 0.999, "min_cos": 0.998, "top1": 0.9,
                           "top1_in_ref_top2": 0.98},
                  "int4": {"mean_cos": 0.99, "context_cos": 0.99, "min_cos": 0.98, "top1": 0.85,
                           "top1_in_ref_top2": 0.95}}
# Regression bounds: 1 - cosine (and 1 - context cosine) within REGRESSION_FACTOR of what was measured.
TRAINED_MEASURED = {"int8": {"mean_cos": 0.99998, "context_cos": 0.99997},  # the worse model of the two
                    "int4": {"mean_cos": 0.99972, "context_cos": 0.99952}}
REGRESSION_FACTOR = 3
TRAINED_REGRESSION = {mode: {k: 1 - REGRESSION_FACTOR * (1 - v) for k, v in measured.items()}
                      for mode, measured in TRAINED_MEASURED.items()}
TRAINED_MAX_LOSS = 4.5  # mean loss on fixed corpus batches; measured 3.7 / 2.4, untrained 7.0 (ln 1024 = 6.93)
TRAINED_MIN_CONTEXT = 0.2


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained-models")
    return {name: ensure_trained(name, root) for name in TRAINED_MODELS}


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_trained_models_meet_the_targets(name, trained_dirs, tmp_path, monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    source = trained_dirs[name]
    assert json.loads((source / TRAINED_MARKER).read_text())["loss"] < TRAINED_MAX_LOSS
    stats = check_targets(name, source, tmp_path)
    regressions = [line for (mode, path), got in stats.items()
                   for line in missed(f"{mode} {path}", got, TRAINED_REGRESSION[mode])]
    assert not regressions, regressions


# Real checkpoints where they can be had (no network here): LANNER_ACCURACY_MODELS=/path/to/TinyLlama-1.1B[:...]
# pytest -m slow -k local_checkpoints -s holds each model directory to the same targets, on both paths.
LOCAL_MODELS = [p for p in os.environ.get("LANNER_ACCURACY_MODELS", "").split(os.pathsep) if p]


@pytest.mark.slow
@pytest.mark.skipif(not LOCAL_MODELS, reason="set LANNER_ACCURACY_MODELS to model directories to measure")
@pytest.mark.parametrize("source", LOCAL_MODELS)
def test_local_checkpoints_meet_the_targets(source, tmp_path, monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    check_targets(Path(source).name, Path(source), tmp_path)


def check_targets(name: str, source: Path, tmp_path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """TRAINED_BOUNDS for the model in `source`, quantized at load on the batched runner and from a `lanner
    quantize` checkpoint (written under `tmp_path`) on the lite runner; returns (mode, path) -> stats."""
    info = inspect_model_dir(source)
    prompts = prompt_ids(load_tokenizer(info.path), info.config.vocab_size)
    ref, greedy = logit_rows(load_runner(info, MAX_LEN, 1), prompts, None)
    share = context_share(ref)
    assert share >= TRAINED_MIN_CONTEXT, (
        f"{name}: only {share:.1%} of the logits depend on the prompt: the cosines would mostly measure the "
        "token-frequency vector every row shares")
    failures, lines, out = [], [f"{name}: context share {share:.1%}"], {}
    for mode, bounds in TRAINED_BOUNDS.items():
        quantize_checkpoint(info, tmp_path / mode, mode)
        for path in ("quantize at load", "lite checkpoint"):
            runner = (load_runner(info, MAX_LEN, 1, quantize=mode) if path == "quantize at load" else
                      load_lite_runner(inspect_model_dir(tmp_path / mode).for_worker(), MAX_LEN, 1))
            stats = out[mode, path] = compare(ref, logit_rows(runner, prompts, greedy)[0])
            del runner  # one quantized model in memory at a time
            lines.append(f"{name} {mode} {path:16s} " + " ".join(f"{k}={v:.5f}" for k, v in stats.items()))
            failures += missed(f"{mode} {path}", stats, bounds)
    print("\n" + "\n".join(lines))
    assert not failures, failures
    return out


def test_reference_runner_refuses_quantize(model_dirs):
    info = inspect_model_dir(model_dirs["demo-llama"])
    with pytest.raises(ValueError, match="batched"):
        build_runner("reference", info, MAX_LEN, 1, None, "int8")


# The 1.1B shape (bench/make_models.py: TinyLlama-1.1B's sizes, random N(0, 0.02) weights, 22 layers).
# Measured with ATen's kernels (bf16 activations): int8 mean cosine 0.9981 (min 0.9972), top-1 0.91, top-1
# within fp32's top-2 1.0; int4 (group 32, head int8) 0.868 (min 0.819), top-1 0.23 (group 128: 0.825,
# 0.20).  With Lanner's kernels (activations quantized per 32-block): int8 0.9976 (min 0.9965), top-1 0.875,
# top-2 1.0; int4 0.867 (min 0.818), top-1 0.25; with integer zero points 0.8666 (min 0.803), top-1 0.16.
# Bounds sit a little below.
TINYLLAMA_BOUNDS = {"int8": {"mean_cos": 0.997, "min_cos": 0.995, "top1": 0.85, "top1_in_ref_top2": 0.95},
                    "int4": {"mean_cos": 0.85, "min_cos": 0.79}}


@pytest.mark.slow
def test_tinyllama_shape(monkeypatch):
    """The issue's 1.1B-shaped model with random weights, int8 and int4 against fp32 (builds the 4.4 GB model
    on first use in ~/.cache/lanner/bench-models; a few minutes on 2 cores).  See the module comment for why
    random weights of this depth stay below the 0.999 / 0.99 targets, which trained weights meet
    (`test_trained_models_meet_the_targets`; bench/README.md has a 22-layer trained model too)."""
    from bench.make_models import DEFAULT_OUT, ensure_model

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    info = inspect_model_dir(ensure_model("tinyllama-1.1b", DEFAULT_OUT)[0])
    prompts = prompt_ids(load_tokenizer(info.path), info.config.vocab_size)
    ref, greedy = logit_rows(load_runner(info, MAX_LEN, 1), prompts, None)
    failures, lines = [], []
    for mode, bounds in TINYLLAMA_BOUNDS.items():
        runner = load_runner(info, MAX_LEN, 1, quantize=mode)
        stats = compare(ref, logit_rows(runner, prompts, greedy)[0])
        del runner
        lines.append(f"tinyllama-1.1b {mode} " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))
        failures += missed(mode, stats, bounds)
    print("\n" + "\n".join(lines))
    assert not failures, failures

