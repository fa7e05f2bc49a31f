"""Offline demo models: a tiny random-weight Llama and Falcon, built locally and deterministically.

Lanner must run (and be tested) with no network, so it ships a recipe, not weights:

* A byte-level BPE tokenizer (~1024 tokens) is trained with the `tokenizers` library on the
  bundled `app/data/corpus.txt`. Byte-level means every Unicode string round-trips exactly.
  BPE training is deterministic (ties are broken by pair order), so two builds give
  byte-identical `tokenizer.json` files.
* Weights are drawn from a seeded `torch.Generator`, parameter by parameter in sorted-name order,
  independent of transformers' own initialisation code. The output head is scaled up so the
  logits are *peaked* (std ~10, top-1 margins >> float noise): greedy decoding never flips on
  float noise, which makes "same tokens alone or in a batch" a strict, fair test for the engine,
  while temperature-1 sampling still picks other tokens now and then.
* Each model is written as an ordinary Hugging Face directory (config.json, model.safetensors,
  generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
  chat_template.jinja) plus a `lanner_demo.json` marker
  holding DEMO_BUILD_VERSION. A model is built in a temporary sibling directory and moved into
  place with `os.replace`, so an interrupted build never leaves a half model behind.

`ensure_demo_models` reuses a cached build with the current DEMO_BUILD_VERSION and serialises
concurrent builders with an `fcntl.flock` lock file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # transformers' model classes are imported where a model is built: importing them pulls in
    # transformers' quantizers (and torchao when installed), ~95 MiB, which a server whose demo models are
    # already built never needs
    from transformers import (
        FalconConfig,
        GenerationConfig,
        LlamaConfig,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )

DEMO_MODEL_IDS: tuple[str, ...] = ("demo-llama", "demo-falcon")
# Bump whenever anything below changes the bytes of a built model (corpus, recipe, sizes, seeds).
DEMO_BUILD_VERSION = "1"

MARKER_FILE = "lanner_demo.json"
LOCK_FILE = ".lanner_demo.lock"
VOCAB_SIZE = 1024
MAX_POSITIONS = 1024
HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
INIT_STD = 0.08  # larger than the usual 0.02 so attention mixes context and outputs vary
HEAD_SCALE = 16.0  # head std = INIT_STD * HEAD_SCALE: logit std ~10, so greedy never flips on float noise

Progress = Callable[[str], None]

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

FALCON_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] | trim }}\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] | trim }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens and chat format of one demo tokenizer."""

    special_tokens: tuple[str, ...]  # trained first, so they get ids 0..n-1 in this order
    eos_token: str
    bos_token: str | None  # prepended by the post-processor when set
    pad_token: str
    stop_tokens: tuple[str, ...]  # generation_config eos_token_id list
    chat_template: str


LLAMA_TOKENS = TokenizerSpec(
    special_tokens=("<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    eos_token="</s>",
    bos_token="<s>",
    pad_token="</s>",
    stop_tokens=("</s>", "<|eot_id|>"),
    chat_template=LLAMA_CHAT_TEMPLATE,
)

FALCON_TOKENS = TokenizerSpec(
    special_tokens=("<|endoftext|>",),
    eos_token="<|endoftext|>",
    bos_token=None,
    pad_token="<|endoftext|>",
    stop_tokens=("<|endoftext|>",),
    chat_template=FALCON_CHAT_TEMPLATE,
)

SEEDS: Mapping[str, int] = MappingProxyType({"demo-llama": 1234, "demo-falcon": 5678})


def _report(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------- tokenizer


def corpus_text() -> str:
    """The bundled tokenizer training corpus."""
    return resources.files("app").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def train_bpe(spec: TokenizerSpec, text: str, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a deterministic byte-level BPE whose vocab (incl. special tokens) is `vocab_size`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    if spec.bos_token is not None:
        bos_id = tok.token_to_id(spec.bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos_token} $A",
            pair=f"{spec.bos_token} $A {spec.bos_token} $B",
            special_tokens=[(spec.bos_token, bos_id)],
        )
    return tok


def build_tokenizer(spec: TokenizerSpec, text: str, vocab_size: int = VOCAB_SIZE,
                    max_positions: int = MAX_POSITIONS) -> PreTrainedTokenizerFast:
    """Wrap a freshly trained BPE in a transformers tokenizer with special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(spec, text, vocab_size=vocab_size)
    extra = [t for t in spec.special_tokens if t not in (spec.bos_token, spec.eos_token, spec.pad_token)]
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        additional_special_tokens=extra,
        model_max_length=max_positions,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = spec.chat_template
    return hf_tok


# --------------------------------------------------------------------------- models


def llama_config(tok: PreTrainedTokenizerFast, **shape: Any) -> LlamaConfig:
    """The demo Llama (GQA); `shape` overrides sizes (the bench builds real-size models with it)."""
    from transformers import LlamaConfig

    sizes = dict(vocab_size=len(tok), hidden_size=HIDDEN_SIZE, intermediate_size=176, num_hidden_layers=NUM_LAYERS,
                 num_attention_heads=NUM_HEADS, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)
    return LlamaConfig(
        **{**sizes, **shape},
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def falcon_config(tok: PreTrainedTokenizerFast, **shape: Any) -> FalconConfig:
    """The falcon-7b layout (multi-query, parallel attention); `shape` overrides sizes.

    Like the real falcon-7b config, bos_token_id is the end-of-text id; the tokenizer never prepends it.
    """
    from transformers import FalconConfig

    sizes = dict(vocab_size=len(tok), hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
                 num_attention_heads=NUM_HEADS, max_position_embeddings=MAX_POSITIONS)
    return FalconConfig(
        **{**sizes, **shape},
        num_kv_heads=1,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        alibi=False,
        bias=False,
        layer_norm_epsilon=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["FalconForCausalLM"],
    )


def _output_head_name(model: PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    return next(name for name, p in model.named_parameters() if p is head.weight)


def init_weights(model: PreTrainedModel, seed: int) -> None:
    """Seeded init independent of transformers: norms = 1/0, matrices ~ N(0, INIT_STD), head scaled."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    head = _output_head_name(model)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * INIT_STD
            if name == head:
                values *= HEAD_SCALE
            param.copy_(values)


def build_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    from transformers import FalconForCausalLM, LlamaForCausalLM

    model_cls = LlamaForCausalLM if config.model_type == "llama" else FalconForCausalLM
    model = model_cls(config).float()
    init_weights(model, seed)
    return model.eval()


def _save_weights(model: PreTrainedModel, out_dir: Path) -> None:
    """config.json + model.safetensors, written directly (deterministic bytes, no progress bars)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out_dir)
    tensors = {name: t.detach().contiguous() for name, t in sorted(model.state_dict().items())}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _write_special_tokens_map(spec: TokenizerSpec, out_dir: Path) -> None:
    """special_tokens_map.json: transformers 5 no longer writes it, but older tools still read it."""
    named = {"bos_token": spec.bos_token, "eos_token": spec.eos_token, "pad_token": spec.pad_token}
    data: dict[str, object] = {k: v for k, v in named.items() if v is not None}
    extra = [t for t in spec.special_tokens if t not in named.values()]
    if extra:
        data["additional_special_tokens"] = extra
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "special_tokens_map.json").write_text(text, encoding="utf-8")


def generation_config(tok: PreTrainedTokenizerFast, spec: TokenizerSpec) -> GenerationConfig:
    from transformers import GenerationConfig

    stop_ids = [tok.convert_tokens_to_ids(t) for t in spec.stop_tokens]
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )


# --------------------------------------------------------------------------- writing


def _build_demo_model(model_id: str, target: Path, text: str) -> None:
    """Build one demo model and write it to `target`."""
    spec = LLAMA_TOKENS if model_id == "demo-llama" else FALCON_TOKENS
    tok = build_tokenizer(spec, text)
    config = llama_config(tok) if model_id == "demo-llama" else falcon_config(tok)
    model = build_model(config, SEEDS[model_id])
    marker = {"model_id": model_id, "build_version": DEMO_BUILD_VERSION}
    write_model_dir(target, model, tok, spec, MARKER_FILE, marker)


def write_model_dir(target: Path, model: PreTrainedModel, tok: PreTrainedTokenizerFast, spec: TokenizerSpec,
                    marker_file: str, marker: Mapping[str, object]) -> None:
    """Write `model` and its tokenizer as an ordinary Hugging Face directory plus a `marker_file` JSON, into a
    temp dir beside `target` that is then moved into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _save_weights(model, tmp)
        generation_config(tok, spec).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_special_tokens_map(spec, tmp)
        (tmp / marker_file).write_text(json.dumps(dict(marker), indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_models(out_dir: Path, progress: Progress | None = None) -> dict[str, Path]:
    """Build every demo model into `out_dir/<model id>`, replacing any previous build."""
    out_dir = Path(out_dir)
    text = corpus_text()
    paths: dict[str, Path] = {}
    for model_id in DEMO_MODEL_IDS:
        _report(progress, f"building demo model {model_id} in {out_dir}")
        target = out_dir / model_id
        _build_demo_model(model_id, target, text)
        paths[model_id] = target
    _report(progress, "demo models ready")
    return paths


def is_current_build(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete demo build made by this DEMO_BUILD_VERSION."""
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("build_version") == DEMO_BUILD_VERSION


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_demo_models(cache_dir: Path, progress: Progress | None = None) -> dict[str, Path]:
    """Return the demo model dirs under `cache_dir`, building them only when missing or outdated.

    A build needs torch and transformers; unless this process has them already, it runs in a child process
    (`call_without_torch_here`), so a server that built its demo models on first start is not left holding
    them. `progress` then has to pickle (a module-level function)."""
    from app.models.loader import call_without_torch_here

    cache_dir = Path(cache_dir)
    paths = {model_id: cache_dir / model_id for model_id in DEMO_MODEL_IDS}
    if not all(is_current_build(p) for p in paths.values()):
        call_without_torch_here(_build_stale, cache_dir, progress)
    return paths


def _build_stale(cache_dir: Path, progress: Progress | None) -> None:
    with _exclusive_lock(cache_dir / LOCK_FILE):
        # Another process may have finished the build while we waited for the lock.
        stale = [model_id for model_id in DEMO_MODEL_IDS if not is_current_build(cache_dir / model_id)]
        if stale:
            text = corpus_text()
            for model_id in stale:
                _report(progress, f"building demo model {model_id} in {cache_dir} (first run only)")
                _build_demo_model(model_id, cache_dir / model_id, text)
            _report(progress, "demo models ready")
