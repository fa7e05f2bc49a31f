"""Find, check and load Hugging Face model directories for Lanner.

Three steps, each turning every failure into a `ModelLoadError` with a message a user can act
on (never a stack trace):

1. `resolve_model_source` maps what the user typed to a local directory: an existing local path
   (optionally confined to `allowed_roots`, symlinks resolved first), or a hub id fetched with
   `huggingface_hub.snapshot_download` restricted to safetensors weights, configs and tokenizer
   files.
2. `inspect_model_dir` checks the directory (config, supported architecture, safetensors weights,
   tokenizer) and returns a `ModelInfo` with what the engine needs to know up front, without
   loading any weights.
   `describe_model_dirs` does it in a short-lived child process for a process without torch (the API
   process): transformers imports torch to read a config.
3. `load_tokenizer` / `load_hf_model` load the transformers objects. `trust_remote_code` is always
   off: only the Llama and Falcon implementations shipped with transformers are ever run.

transformers is imported where it is used, never by importing this module: a worker process builds its
decoder from `ModelInfo.for_worker()` (a `ConfigView` of the config the API process read) and decodes
with the tokenizer's Rust backend alone (`backend_tokenizer_json` / `worker_tokenizer`), so it never
imports transformers: ~20 MiB resident for transformers itself, and 59 MiB more once a Llama config is
read (`configuration_llama` pulls in transformers' model-loading machinery, torch.distributed and sympy).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch
    from transformers import FalconConfig, PretrainedConfig, PreTrainedModel

T = TypeVar("T")

# config.json model_type -> Lanner architecture family.
SUPPORTED_ARCHITECTURES: Mapping[str, str] = MappingProxyType({
    "llama": "llama",
    "falcon": "falcon",
    "RefinedWeb": "falcon",  # old falcon-40b style configs
    "RefinedWebModel": "falcon",  # old falcon-7b style configs
})

# Lanner architecture family -> transformers' model class (reference runner and tests only). Imported
# when needed: transformers' modeling modules pull in its quantizers (and torchao when installed), about
# 100 MiB of resident memory in every process that never runs them.
MODEL_CLASS_NAMES: Mapping[str, str] = MappingProxyType({
    "llama": "LlamaForCausalLM",
    "falcon": "FalconForCausalLM",
})

HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
)

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model")

_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID_RE = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
_LOCAL_PREFIXES = ("/", "./", "../", "~")


class ModelLoadError(Exception):
    """A model could not be found, checked or loaded. `str(err)` is a complete user-facing message."""


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class ConfigView:
    """A model config's resolved attributes as plain values: what a worker builds its decoder from.

    transformers' config classes normalise config.json (defaults, renamed keys, derived properties such
    as FalconConfig.head_dim); the API process reads the config with them once and hands the worker this
    snapshot: every serialised field and every public attribute with a plain value (properties and
    `attribute_map` aliases included), read from the real config object. A missing name raises
    AttributeError like a config does (`getattr` defaults keep working). Values are JSON-plain, so it
    unpickles without transformers or torch (a worker unpickles it before it pins its CPUs and imports torch).
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)

    @classmethod
    def of(cls, config: Any) -> ConfigView:
        if isinstance(config, ConfigView):
            return config
        values = config.to_dict()
        hf_log = logging.getLogger("transformers")
        level = hf_log.level
        hf_log.setLevel(logging.ERROR)  # deprecated aliases (torch_dtype, use_return_dict) warn when read
        try:
            for name in dir(config):
                if name.startswith("_"):
                    continue
                try:
                    value = getattr(config, name)
                except Exception:  # a property that does not apply to this config
                    continue
                # not methods, nor transformers' own objects (per_layer_config): they need it to unpickle
                if not callable(value) and _plain(value):
                    values[name] = value
        finally:
            hf_log.setLevel(level)
        return cls(values)

    def __repr__(self) -> str:
        return f"ConfigView({self.__dict__!r})"


@dataclass
class ModelInfo:
    """What the engine needs to know about a checked model directory before loading weights."""

    path: Path
    arch: str  # "llama" | "falcon"
    config: PretrainedConfig | ConfigView
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None  # from the config; whether it is prepended is the tokenizer's job
    tokenizer_class: str | None = None  # set by `describe_model_dirs`: what `load_tokenizer` loads directly

    def for_worker(self) -> ModelInfo:
        """This info with the config as a `ConfigView`: picklable into a worker that has no transformers."""
        return replace(self, config=ConfigView.of(self.config))


# --------------------------------------------------------------------------- resolving


def looks_like_local_path(source: str) -> bool:
    return source.startswith(_LOCAL_PREFIXES) or source in (".", "..")


def is_valid_hub_id(source: str) -> bool:
    """`name` or `org/name` made of letters, digits, `.`, `_`, `-`; no `..`, no `--` tricks."""
    return bool(HUB_ID_RE.match(source)) and ".." not in source and "--" not in source


def _check_local_dir(path: Path, source: str, allowed_roots: Sequence[Path] | None) -> Path:
    if not path.exists():
        raise ModelLoadError(f"Model path {source!r} does not exist.")
    resolved = path.resolve()
    if not resolved.is_dir():
        raise ModelLoadError(f"Model path {source!r} is not a directory.")
    if allowed_roots:
        roots = [Path(r).expanduser().resolve() for r in allowed_roots]
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            shown = ", ".join(str(r) for r in roots)
            raise ModelLoadError(
                f"Model path {source!r} (resolved to {resolved}) is outside the allowed model roots: {shown}."
            )
    return resolved


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download_from_hub(repo_id: str, revision: str | None, cache_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(HUB_ALLOW_PATTERNS),
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            local_files_only=hub_offline(),
        )
    except Exception as exc:  # hub, network, auth and offline-mode errors all end here
        raise ModelLoadError(
            f"Model {repo_id!r} could not be downloaded from the Hugging Face Hub "
            f"(offline, unknown repository or access denied: {type(exc).__name__}). "
            "Pass a local model directory instead."
        ) from exc
    return Path(local)


def resolve_model_source(
    source: str,
    *,
    allowed_roots: Sequence[Path] | None = None,
    cache_dir: Path | None = None,
    revision: str | None = None,
) -> Path:
    """Turn a user-supplied model reference (local dir or hub id) into a local directory path."""
    source = source.strip()
    if not source:
        raise ModelLoadError("Empty model name: give a local model directory or a hub id like org/name.")
    local = Path(source).expanduser()
    if looks_like_local_path(source) or local.exists():
        return _check_local_dir(local, source, allowed_roots)
    if is_valid_hub_id(source):
        return _download_from_hub(source, revision, cache_dir)
    raise ModelLoadError(
        f"Model {source!r} is not a directory or a valid hub id (expected a path or 'org/name')."
    )


# --------------------------------------------------------------------------- inspecting


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object.")
    return data


def _arch_for(model_type: Any, path: Path) -> str:
    arch = SUPPORTED_ARCHITECTURES.get(str(model_type)) if model_type else None
    if arch is None:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ModelLoadError(
            f"Model in {path} has unsupported model_type {model_type!r}; supported: {supported}."
        )
    return arch


def _check_weights(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ModelLoadError(
            f"Model in {path} has no safetensors weights: only .bin/.pt (pickle) weights were found, "
            "which Lanner refuses to load because they can run arbitrary code. Convert them to safetensors."
        )
    raise ModelLoadError(f"Model in {path} has no safetensors weights (*.safetensors).")


def _check_tokenizer(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"Model in {path} has no tokenizer files (expected one of: {', '.join(TOKENIZER_FILES)})."
        )


# Keys of pre-transformers Falcon configs, renamed in transformers' FalconConfig
# (transformers 5 no longer maps the old names through FalconConfig.attribute_map).
_LEGACY_FALCON_KEYS: Mapping[str, str] = MappingProxyType({
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_head_kv": "num_kv_heads",
})


def _legacy_falcon_config(raw: dict[str, Any]) -> FalconConfig:
    """A FalconConfig from an old `RefinedWeb` (falcon-40b) / `RefinedWebModel` (falcon-7b) config.json."""
    values = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
    for old, new in _LEGACY_FALCON_KEYS.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    values["new_decoder_architecture"] = raw.get("model_type") == "RefinedWeb"
    if values.get("multi_query") and not values["new_decoder_architecture"]:
        values.setdefault("num_kv_heads", 1)
    values["architectures"] = ["FalconForCausalLM"]
    from transformers import FalconConfig

    return FalconConfig.from_dict(values)


def _load_config(path: Path, raw: dict[str, Any]) -> PretrainedConfig:
    try:
        if raw.get("model_type") in ("RefinedWeb", "RefinedWebModel"):
            return _legacy_falcon_config(raw)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"Cannot load config.json of {path}: {exc}") from exc


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _eos_ids(path: Path, config: PretrainedConfig) -> tuple[int, ...]:
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        ids = _as_id_tuple(_read_json(gen_path).get("eos_token_id"))
        if ids:
            return ids
    return _as_id_tuple(getattr(config, "eos_token_id", None))


def inspect_model_dir(path: Path) -> ModelInfo:
    """Check a local model directory and describe it, without loading weights."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"Model directory {path} does not exist.")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"Model directory {path} is missing config.json.")
    raw = _read_json(config_path)
    arch = _arch_for(raw.get("model_type"), path)
    _check_weights(path)
    _check_tokenizer(path)
    config = _load_config(path, raw)
    return ModelInfo(
        path=path,
        arch=arch,
        config=config,
        max_model_len=int(config.max_position_embeddings),
        vocab_size=int(config.vocab_size),
        eos_token_ids=_eos_ids(path, config),
        bos_token_id=getattr(config, "bos_token_id", None),
    )


# --------------------------------------------------------------------------- loading


def describe_model_dirs(paths: Sequence[Path]) -> list[ModelInfo]:
    """`inspect_model_dir` for each path, each with its `tokenizer_class` and its config as a `ConfigView`.

    transformers reads a config only with torch imported (`configuration_utils` imports
    `modeling_rope_utils`, which imports torch), and `AutoTokenizer` reads one to pick a class: ~250 MiB
    resident for the life of a process that never runs a model. So unless this process has torch already
    (nothing to save), the reading happens in a short-lived child process and this one gets plain values;
    `load_tokenizer(path, info.tokenizer_class)` then loads the tokenizer class itself, which transformers
    defines without torch. A `ModelLoadError` in the child is raised here with its message.
    """
    paths = [Path(p) for p in paths]
    return call_without_torch_here(_describe, paths) if paths else []


def call_without_torch_here(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, in a short-lived spawned child process unless this process has imported torch already.

    For work that needs torch (or transformers' config classes, which import it) in a process that otherwise
    never runs a model: torch stays resident once imported (~220 MiB). `fn`, its arguments and its result
    pickle; an exception raised in the child is raised here."""
    if "torch" in sys.modules:
        return fn(*args)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _describe(paths: Sequence[Path]) -> list[ModelInfo]:
    infos = []
    for path in paths:
        info = inspect_model_dir(path)
        tokenizer = load_tokenizer(path)
        infos.append(replace(info.for_worker(), tokenizer_class=f"{type(tokenizer).__module__}."
                                                                f"{type(tokenizer).__qualname__}"))
    return infos


def load_tokenizer(path: Path, tokenizer_class: str | None = None) -> Any:
    """The model's transformers tokenizer (fast, from tokenizer.json when present).

    `tokenizer_class` (a `ModelInfo.tokenizer_class`: a class of transformers' own, as `AutoTokenizer` chose
    it) is loaded directly, without `AutoTokenizer`, which imports torch."""
    try:
        if tokenizer_class is None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        module, _, name = tokenizer_class.rpartition(".")
        if not module.startswith("transformers."):
            raise ValueError(f"{tokenizer_class!r} is not a transformers tokenizer class")
        return getattr(importlib.import_module(module), name).from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"Cannot load the tokenizer of {path}: {exc}") from exc


def backend_tokenizer_json(tokenizer: Any) -> str | None:
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer, serialised as transformers set
    it up (added and special tokens included); None for a slow (pure Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else None


def worker_tokenizer(path: Path, backend_json: str | None) -> Any:
    """What a worker detokenizes with: the backend from `backend_tokenizer_json` when there is one (the
    `tokenizers` library only), else the transformers tokenizer of `path`."""
    if backend_json is None:
        return load_tokenizer(path)
    from tokenizers import Tokenizer

    return Tokenizer.from_str(backend_json)


def load_hf_model(info: ModelInfo, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The reference transformers model for `info` (fp32 unless `dtype`), in eval mode."""
    import torch

    from app.quant.checkpoint import MANIFEST_FILE

    if (info.path / MANIFEST_FILE).is_file():  # its tensors are Lanner's int8/int4 layout, not transformers'
        raise ModelLoadError(f"Model in {info.path} is a Lanner pre-quantized checkpoint; only the batched "
                             "runner can serve it (runner: batched).")
    import transformers

    model_cls = getattr(transformers, MODEL_CLASS_NAMES[info.arch])
    try:
        model = model_cls.from_pretrained(
            info.path, config=info.config, dtype=dtype or torch.float32, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelLoadError(f"Cannot load the weights of {info.path}: {exc}") from exc
    return model.eval()
