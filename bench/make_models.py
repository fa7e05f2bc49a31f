"""Build random-weight benchmark models with the sizes of real models, as ordinary HF directories.

Three models, written to a cache outside the repo (default `~/.cache/lanner/bench-models`):

* `tinyllama-1.1b`: TinyLlama-1.1B's shape (LlamaForCausalLM, hidden 2048, 22 layers, 32 heads,
  4 KV heads, intermediate 5632, vocab 32000, 2048 positions, rope theta 10000). 1.10B params, 4.4 GB fp32.
* `falcon-7b-layout`: falcon-7b's layer layout (hidden 4544, 71 heads of 64, multi-query attention,
  parallel attention, no linear biases, no alibi, vocab 65024) with only `--falcon-layers` decoder layers
  (default 8). The full 32 layers are 28 GB in fp32 and do not fit a useful fp32 run in 24 GiB; with
  8 layers and an untied output head the model has ~2.25B params (9.0 GB fp32). Per-layer cost is exactly
  falcon-7b's, so per-token time scales to 32 layers by ~32/8 for the layer part. `num_kv_heads: 1`
  is written to config.json (llama.cpp's converter reads it for multi-query models).
* `falcon-7b`: falcon-7b's full shape (the layout above with its 32 layers, 7.2B params), stored in
  **bf16** (14.4 GB; fp32 would be 29 GB, more than this machine's RAM and free disk). Values are drawn
  in fp32 like the others and rounded to bf16 once: every engine reads those bf16 values (Lanner widens
  them to fp32 exactly; llama.cpp's GGUFs are made from a bf16 GGUF), so all see the same weights. No
  fp32 engine can run it here; it measures Lanner's int8/int4 and llama.cpp's Q8_0/Q4_0 at real size.

Tokenizer: the project's demo recipe (`app/models/demo.py`: byte-level BPE trained on the bundled
corpus, deterministic), asked for as many tokens as the corpus allows (~10k). The model's vocab
(32000 / 65024) is larger than the tokenizer: the extra embedding rows are never looked up and their
output-head rows are zero, like the padding rows of real checkpoints.

Weights: N(0, 0.02) from a seeded `torch.Generator`, tensor by tensor in sorted-name order; norms are
1 / 0. The output head has std 10/sqrt(hidden), so logits (after the final norm) have std ~10:
greedy output is stable and peaked. Head rows of ids that are padding, special tokens (EOS...), or
do not decode to clean text on their own (lone UTF-8 bytes) are zero, so they never win greedy
decoding: every generated token is printable text and a streaming server sends one chunk per token.

The safetensors file is streamed to disk one tensor at a time (peak RAM: the largest tensor), in a
temporary sibling directory that is moved into place when complete. A `lanner_bench.json` marker
records the recipe; an existing build with the same marker is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/make_models.py` from anywhere: import the `app` package
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from app.models import demo  # noqa: E402

BUILD_VERSION = "1"  # bump when anything below changes the bytes of a built model
MARKER_FILE = "lanner_bench.json"
MODEL_NAMES: tuple[str, ...] = ("tinyllama-1.1b", "falcon-7b-layout", "falcon-7b")
BUILT_BY_DEFAULT = MODEL_NAMES[:2]  # falcon-7b (14.4 GB) only when named
DEFAULT_OUT = Path("~/.cache/lanner/bench-models").expanduser()
MAX_POSITIONS = 2048
TOKENIZER_VOCAB = 32000  # asked of the BPE trainer; the bundled corpus yields ~10k
INIT_STD = 0.02
LOGIT_STD = 10.0  # output head std = LOGIT_STD / sqrt(hidden)
HEAD_NAME = "lm_head.weight"  # same name in LlamaForCausalLM and FalconForCausalLM
SEEDS = {"tinyllama-1.1b": 11, "falcon-7b-layout": 77, "falcon-7b": 78}
STORED_DTYPES = {"falcon-7b": torch.bfloat16}  # others: fp32
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

Progress = Callable[[int], None]  # called with the number of bytes just written


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the bytes of one bench model (stored in the marker file)."""

    name: str
    build_version: str
    seed: int
    num_layers: int
    dtype: str = "F32"  # the stored dtype (safetensors name)

    def marker(self) -> dict[str, object]:
        marker = asdict(self)
        if self.dtype == "F32":  # the fp32 models' markers from before the field existed stay current
            del marker["dtype"]
        return marker

    @property
    def torch_dtype(self) -> torch.dtype:
        return next(t for t, name in DTYPE_NAMES.items() if name == self.dtype)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(spec: demo.TokenizerSpec) -> PreTrainedTokenizerFast:
    """The demo tokenizer recipe with the largest vocab the corpus allows (deterministic)."""
    return demo.build_tokenizer(spec, demo.corpus_text(), vocab_size=TOKENIZER_VOCAB, max_positions=MAX_POSITIONS)


def printable_token_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """Ids that are not special and decode, alone, to non-empty text without U+FFFD."""
    special = set(tok.all_special_ids)
    backend = tok.backend_tokenizer
    ids = []
    for i in range(backend.get_vocab_size()):
        text = backend.decode([i], skip_special_tokens=False)
        if i not in special and text and "\ufffd" not in text:
            ids.append(i)
    return ids


# --------------------------------------------------------------------------- configs


def tinyllama_config(tok: PreTrainedTokenizerFast, num_layers: int = 22) -> LlamaConfig:
    return demo.llama_config(tok, vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=num_layers,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS)


def falcon_config(tok: PreTrainedTokenizerFast, num_layers: int) -> FalconConfig:
    return demo.falcon_config(tok, vocab_size=65024, hidden_size=4544, num_hidden_layers=num_layers,
                              num_attention_heads=71, max_position_embeddings=MAX_POSITIONS)


def parameter_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, from a model built on the meta device (no memory)."""
    model_cls = LlamaForCausalLM if config.model_type == "llama" else FalconForCausalLM
    with torch.device("meta"):
        model = model_cls(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# --------------------------------------------------------------------------- weights


def make_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, *, hidden: int,
                head_rows: list[int] | None) -> torch.Tensor:
    """One fp32 parameter: norms 1/0, matrices N(0, INIT_STD), the head scaled with only `head_rows` set."""
    if len(shape) == 1:
        return torch.full(shape, 1.0 if name.endswith("weight") else 0.0, dtype=torch.float32)
    values = torch.randn(shape, generator=gen, dtype=torch.float32)
    if head_rows is None:
        return values.mul_(INIT_STD)
    head = torch.zeros(shape, dtype=torch.float32)
    rows = torch.tensor(head_rows, dtype=torch.long)
    head[rows] = values[rows] * (LOGIT_STD / math.sqrt(hidden))
    return head


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding `shapes` in sorted order."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]],
                      tensors: Iterable[tuple[str, torch.Tensor]], progress: Progress | None = None,
                      dtype: torch.dtype = torch.float32) -> None:
    """Stream tensors (yielded in sorted-name order) into one safetensors file, each stored as `dtype`."""
    expected = sorted(shapes)
    with open(path, "wb") as fh:
        fh.write(safetensors_header(shapes, dtype))
        for i, (name, tensor) in enumerate(tensors):
            if name != expected[i] or tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"tensor {i} is {name} {tuple(tensor.shape)}, expected {expected[i]}")
            data = tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()  # raw little-endian
            fh.write(data)
            if progress is not None:
                progress(len(data))


def generate_weights(config: PretrainedConfig, seed: int, head_rows: list[int]
                     ) -> Iterable[tuple[str, torch.Tensor]]:
    shapes = parameter_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(shapes):
        rows = head_rows if name == HEAD_NAME else None
        yield name, make_tensor(name, shapes[name], gen, hidden=config.hidden_size, head_rows=rows)


# --------------------------------------------------------------------------- model dirs


def recipe_for(name: str, falcon_layers: int) -> Recipe:
    layers = {"tinyllama-1.1b": 22, "falcon-7b": 32}.get(name, falcon_layers)
    return Recipe(name=name, build_version=BUILD_VERSION, seed=SEEDS[name], num_layers=layers,
                  dtype=DTYPE_NAMES[STORED_DTYPES.get(name, torch.float32)])


def is_current(model_dir: Path, recipe: Recipe) -> bool:
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == recipe.marker()


def num_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> int:
    return sum(math.prod(s) for s in shapes.values()) * dtype.itemsize


def write_model_dir(recipe: Recipe, target: Path, progress_factory: Callable[[int], Progress] | None = None
                    ) -> None:
    """Build one model into a temp dir beside `target`, then move it into place.  Recipes named
    tinyllama-* have TinyLlama-1.1B's layer shape (with recipe.num_layers layers), the others falcon-7b's."""
    llama = recipe.name.startswith("tinyllama")
    spec = demo.LLAMA_TOKENS if llama else demo.FALCON_TOKENS
    tok = build_tokenizer(spec)
    config = tinyllama_config(tok, recipe.num_layers) if llama else falcon_config(tok, recipe.num_layers)
    shapes = parameter_shapes(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", dir=target.parent))
    try:
        config.save_pretrained(tmp)
        _force_config_fields(tmp / "config.json", config)
        demo.generation_config(tok, spec).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        demo._write_special_tokens_map(spec, tmp)  # same helper as the demo models (older tools read it)
        progress = progress_factory(num_bytes(shapes, recipe.torch_dtype)) if progress_factory else None
        weights = generate_weights(config, recipe.seed, printable_token_ids(tok))
        write_safetensors(tmp / "model.safetensors", shapes, weights, progress, recipe.torch_dtype)
        (tmp / MARKER_FILE).write_text(json.dumps(recipe.marker(), indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _force_config_fields(path: Path, config: PretrainedConfig) -> None:
    """Falcon: write `num_kv_heads: 1` explicitly for multi-query (llama.cpp's converter reads it)."""
    if config.model_type != "falcon":
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    data["num_kv_heads"] = 1
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def ensure_model(name: str, out_dir: Path, *, falcon_layers: int = 8, force: bool = False,
                 progress_factory: Callable[[int], Progress] | None = None) -> tuple[Path, bool]:
    """Return (model dir, built now?); reuses a build whose marker matches the recipe."""
    recipe = recipe_for(name, falcon_layers)
    target = Path(out_dir).expanduser() / name
    if not force and is_current(target, recipe):
        return target, False
    write_model_dir(recipe, target, progress_factory)
    return target, True


# --------------------------------------------------------------------------- CLI


def _tqdm_factory(name: str) -> Callable[[int], Progress]:
    from tqdm import tqdm

    def factory(total: int) -> Progress:
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr)
        return bar.update

    return factory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="NAME",
                        help=f"models to build: {', '.join(MODEL_NAMES)} "
                             f"(default: {', '.join(BUILT_BY_DEFAULT)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache directory (default {DEFAULT_OUT})")
    parser.add_argument("--falcon-layers", type=int, default=8,
                        help="decoder layers of falcon-7b-layout (default 8 = ~2.25B params; `falcon-7b` has 32)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching build exists")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODEL_NAMES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}")
    for name in args.models or BUILT_BY_DEFAULT:
        path, built = ensure_model(name, args.out, falcon_layers=args.falcon_layers, force=args.force,
                                   progress_factory=_tqdm_factory(name))
        print(f"{name}\t{path}\t{'built' if built else 'cached'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
