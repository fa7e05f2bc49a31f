"""Small Llama and Falcon models trained here, deterministically, on the bundled corpus.

Random weights are the worst case for weight-only quantization: every logit is a sum of random features,
so each matrix's rounding error reaches the output at full size (bench/quant_floor.py measures that floor).
Trained weights are not like that, and no trained checkpoint can be downloaded here, so this module makes
some: the demo tokenizers (byte-level BPE, 1024 tokens, trained on `app/data/corpus.txt`) and a model of
the real architecture trained on the same corpus with AdamW for a few hundred steps, from a seeded init,
on a seeded sequence of batches. The accuracy tests (tests/model/test_woq_accuracy.py) quantize these.

Recipes (`RECIPES`):

* `trained-llama`: demo-llama's tokenizer and template, Llama with grouped-query attention (4 heads of
  64, 2 KV heads), hidden 256, 4 layers, intermediate 704.
* `trained-falcon`: demo-falcon's tokenizer, falcon-7b's layout (multi-query, parallel attention, no
  biases), hidden 256, 4 layers.
* `trained-llama-deep`: TinyLlama-1.1B's depth (22 layers) at hidden 256; slower to train (benchmarks
  only), it shows whether depth alone makes a trained model sensitive.
* `untrained-<name>` for each (`untrained-llama`...): the same model at step 0, its seeded init (HF's
  N(0, 0.02)), the control that bench/quant_floor.py compares against.

Each is written as an ordinary Hugging Face directory with a `lanner_trained.json` marker holding the
recipe, what else decides the weights (torch, transformers and tokenizers versions, torch's thread count,
the corpus's sha256) and the model's mean loss on EVAL_BATCHES fixed batches of the corpus (the training
text: it says how much was learned, not how well it generalizes); `ensure_trained` reuses a directory whose
marker matches. Training is deterministic for those: the same inputs give the same bytes.

What these models are not: the corpus is 48k tokens, seen ~13 times in 300 steps, one seed per recipe, hidden
256. They use context (their prompt-dependent logits are 39-57% of the logits' energy), but they have none of
the outlier features that large trained models grow, which make per-channel int8 harder.

    python bench/train_models.py [NAME ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/train_models.py` from anywhere: import the `app` package
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from app.models import demo  # noqa: E402

BUILD_VERSION = "1"  # bump when anything below changes the trained weights
MARKER_FILE = "lanner_trained.json"
DEFAULT_OUT = Path("~/.cache/lanner/trained-models").expanduser()
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides one trained model (stored in its marker)."""

    name: str
    arch: str  # "llama" | "falcon"
    shape: dict[str, int] = field(hash=False)  # config overrides of demo.llama_config / demo.falcon_config
    steps: int = 300
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    build_version: str = BUILD_VERSION

    def config(self, tok):
        make = demo.llama_config if self.arch == "llama" else demo.falcon_config
        return make(tok, **self.shape)


SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512)
RECIPES: dict[str, Recipe] = {
    "trained-llama": Recipe("trained-llama", "llama", dict(SMALL, num_key_value_heads=2, intermediate_size=704),
                            seed=1),
    "trained-falcon": Recipe("trained-falcon", "falcon", dict(SMALL), seed=2),
    "trained-llama-deep": Recipe("trained-llama-deep", "llama",
                                 dict(SMALL, num_hidden_layers=22, num_key_value_heads=2, intermediate_size=704),
                                 seed=3),
}
RECIPES.update({f"un{name}": replace(r, name=f"un{name}", steps=0) for name, r in list(RECIPES.items())})
TESTED = ("trained-llama", "trained-falcon")  # cheap enough for CI (about a minute each on 2 cores)
EVAL_BATCHES = 8


def corpus_ids(tok) -> torch.Tensor:
    """The bundled corpus as one token sequence."""
    return torch.tensor(tok.backend_tokenizer.encode(demo.corpus_text(), add_special_tokens=False).ids)


def batch(ids: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq_len + 1] windows of `ids` at random offsets drawn from `gen`."""
    starts = torch.randint(0, len(ids) - recipe.seq_len, (recipe.batch,), generator=gen)
    return ids[starts[:, None] + torch.arange(recipe.seq_len + 1)]


def lm_loss(model, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, recipe: Recipe) -> float:
    """Mean loss over EVAL_BATCHES batches drawn from a fixed generator (the same for every recipe seed)."""
    gen = torch.Generator().manual_seed(12345)
    return sum(lm_loss(model, batch(ids, recipe, gen)).item() for _ in range(EVAL_BATCHES)) / EVAL_BATCHES


def train(recipe: Recipe, progress: Progress | None = None):
    """(model, tokenizer, spec, eval loss): `recipe`'s model trained from its seeded init."""
    from transformers import FalconForCausalLM, LlamaForCausalLM

    spec = demo.LLAMA_TOKENS if recipe.arch == "llama" else demo.FALCON_TOKENS
    tok = demo.build_tokenizer(spec, demo.corpus_text())
    ids = corpus_ids(tok)
    config = recipe.config(tok)
    with torch.random.fork_rng():  # transformers' init draws from the global generator
        torch.manual_seed(recipe.seed)
        model = (LlamaForCausalLM if recipe.arch == "llama" else FalconForCausalLM)(config).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    started = time.monotonic()
    for step in range(recipe.steps):
        for group in opt.param_groups:  # linear warm-up, then cosine decay to zero
            warm = min(1.0, (step + 1) / max(1, recipe.warmup))
            group["lr"] = recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        loss = lm_loss(model, batch(ids, recipe, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None and (step % 50 == 0 or step == recipe.steps - 1):
            progress(f"{recipe.name}: step {step + 1}/{recipe.steps} loss {loss.item():.3f} "
                     f"({time.monotonic() - started:.0f} s)")
    model.eval()
    return model, tok, spec, eval_loss(model, ids, recipe)


def marker(recipe: Recipe) -> dict[str, object]:
    """What decides the trained weights besides the code: the recipe, library versions, threads and corpus."""
    import tokenizers
    import transformers

    corpus = hashlib.sha256(demo.corpus_text().encode()).hexdigest()
    return {"recipe": asdict(recipe), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "threads": torch.get_num_threads(), "corpus_sha256": corpus}


def is_current(model_dir: Path, recipe: Recipe) -> bool:
    try:
        found = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = marker(recipe)
    return isinstance(found, dict) and {k: found.get(k) for k in expected} == expected


def ensure_trained(name: str, out_dir: Path = DEFAULT_OUT, progress: Progress | None = None) -> Path:
    """`out_dir/name`, trained and written unless a directory made by the same recipe is there."""
    recipe, target = RECIPES[name], Path(out_dir) / name
    if not is_current(target, recipe):
        model, tok, spec, loss = train(recipe, progress)
        demo.write_model_dir(target, model, tok, spec, MARKER_FILE, dict(marker(recipe), loss=round(loss, 4)))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to train (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    for name in args.names or RECIPES:
        print(ensure_trained(name, args.out, progress=print))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
