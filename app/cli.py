"""`lanner serve | quantize | make-demo-models` (also `python -m app ...`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from app import __version__


def _progress(msg: str) -> None:
    print(f"lanner: {msg}", file=sys.stderr, flush=True)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    # Containers configure `serve` by environment: each of these flags also reads LANNER_<FLAG>.
    def env(name: str) -> str | None:
        return os.environ.get(name) or None  # an empty variable (e.g. from compose) means unset
    p.add_argument("--config", type=Path, default=env("LANNER_CONFIG"),
                   help="YAML settings file with a `models:` registry (LANNER_CONFIG)")
    p.add_argument("--model", default=env("LANNER_MODEL"),
                   help="serve one model: a hub id or a local directory (LANNER_MODEL)")
    p.add_argument("--model-id", default=env("LANNER_MODEL_ID"),
                   help="the id clients use for --model (default: the source's last part)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default=env("LANNER_QUANTIZE"))
    p.add_argument("--woq-backend", choices=["native", "torchao", "ipex"], default=env("LANNER_WOQ_BACKEND"),
                   help="who runs the quantized layers of --model: native ATen kernels (default), torchao or "
                        "ipex (optional installs; LANNER_WOQ_BACKEND)")
    p.add_argument("--int4-group-size", type=int, choices=[32, 64, 128, 256], default=env("LANNER_INT4_GROUP_SIZE"),
                   help="int4 group size for --model (default 32; LANNER_INT4_GROUP_SIZE)")
    p.add_argument("--int4-head", choices=["int8", "int4"], default=env("LANNER_INT4_HEAD"),
                   help="the output head of an int4 --model: int8 (default) or int4 (fewer bytes a token, "
                        "less accurate; LANNER_INT4_HEAD)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp32", "bf16"], default=env("LANNER_KV_CACHE_DTYPE"),
                   help="KV cache element type for --model: auto (default) = bf16 when quantized, else fp32 "
                        "(LANNER_KV_CACHE_DTYPE)")
    p.add_argument("--runner", choices=["auto", "batched", "lite", "reference"], default=env("LANNER_RUNNER"),
                   help="who runs --model: auto (default: lite for a `lanner quantize` directory or --quantize, "
                        "else batched), "
                        "lite (a worker without torch), batched (Lanner's torch decoders) or reference "
                        "(transformers; LANNER_RUNNER)")
    p.add_argument("--cpus", default=env("LANNER_CPUS"), help='cores for --model, e.g. "0-1"')
    p.add_argument("--max-num-seqs", type=int, default=env("LANNER_MAX_NUM_SEQS"),
                   help="max concurrent sequences for --model")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_const", const=False,
                   default=None, help="prefill every prompt in full instead of continuing from a prefix a "
                                      "free KV slot still holds (--model)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this API key (repeatable; also LANNER_API_KEY, comma-separated)")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="file with API keys, one per line (also LANNER_API_KEY_FILE)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where demo models, downloads and quantized checkpoints are cached")
    p.add_argument("--no-quantized-cache", dest="quantized_cache", action="store_const", const=False, default=None,
                   help="quantize at every start in a torch worker instead of once into the cache's quantized/ "
                        "for the torch-free runner (LANNER_QUANTIZED_CACHE=false)")
    p.add_argument("--log-level", default=None)


def _cli_models(args: argparse.Namespace) -> list | None:
    from app.config import ModelSpec

    if not args.model:
        return None
    from app.models.loader import looks_like_local_path

    # like vLLM: a hub model is served under its hub id, a local directory under its name
    local = looks_like_local_path(args.model) or Path(args.model).expanduser().is_dir()
    model_id = args.model_id or (Path(args.model.rstrip("/")).name if local else args.model)
    spec: dict = {"id": model_id, "source": args.model}
    for key in ("quantize", "woq_backend", "int4_group_size", "int4_head", "kv_cache_dtype", "runner", "cpus",
                "max_num_seqs", "prefix_caching"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    return [ModelSpec(**spec)]


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.config import ModelSpec, load_settings
    from app.engine.registry import ModelRegistry
    from app.main import create_app
    from app.models.loader import ModelLoadError
    from app.server import run

    try:
        settings = load_settings(
            args.config, host=args.host, port=args.port, api_keys=args.api_key, api_key_file=args.api_key_file, models=_cli_models(args),
            cache_dir=args.cache_dir, log_level=args.log_level, quantized_cache=args.quantized_cache,
        )
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        _progress(f"error: invalid settings: {exc}")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not settings.models:
        from app.models.demo import ensure_demo_models

        paths = ensure_demo_models(settings.demo_dir, progress=_progress)
        update: dict = {"models": [ModelSpec(id=mid, source=str(p)) for mid, p in paths.items()]}
        if settings.model_roots:
            update["model_roots"] = [*settings.model_roots, settings.demo_dir]
        settings = settings.model_copy(update=update)

    registry = ModelRegistry(settings)
    try:
        registry.prepare()
    except ModelLoadError as exc:
        _progress(f"error: {exc}")
        return 2
    _progress(f"serving {', '.join(registry.handles)} on http://{settings.host}:{settings.port}")
    # uvicorn re-raises a shutdown signal under the handler that was in place before it started; an
    # ignoring handler here makes a completed graceful shutdown (and drain, app/server.py) exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        app = create_app(settings, registry)
    except OSError as exc:  # e.g. an unreadable api_key_file
        _progress(f"error: {exc}")
        return 2
    run(app, settings)
    return 0


def make_demo_models(args: argparse.Namespace) -> int:
    from app.config import default_cache_dir
    from app.models.demo import build_demo_models

    out = args.out or default_cache_dir() / "demo-models"
    paths = build_demo_models(out, progress=_progress)
    for mid, path in paths.items():
        print(f"{mid}\t{path}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a pre-quantized (weight-only int8/int4) copy of a model")
    p.add_argument("source", help="a local model directory or a hub id")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True,
                   help="8: int8 per output channel; 4: int4 in groups")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=None,
                   help="int4 group size (default: the quantizer's choice per layer)")
    p.add_argument("--int4-head", choices=["int8", "int4"], default=None,
                   help="the output head with --bits 4: int8 (default) or int4")
    p.add_argument("--cache-dir", type=Path, default=None, help="where hub downloads are cached")


def quantize(args: argparse.Namespace) -> int:
    if args.bits == 8 and args.group_size is not None:
        _progress("error: --group-size applies to --bits 4 only (int8 scales are per output channel)")
        return 2
    if args.bits == 8 and args.int4_head is not None:
        _progress("error: --int4-head applies to --bits 4 only")
        return 2
    from app.config import default_cache_dir
    from app.models.loader import ModelLoadError, inspect_model_dir, resolve_model_source
    from app.quant.checkpoint import quantize_checkpoint, return_freed_memory_promptly

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return_freed_memory_promptly()  # peak memory: one layer at a time, not the allocator's leftovers
    try:
        path = resolve_model_source(args.source, cache_dir=(args.cache_dir or default_cache_dir()) / "hub")
        mode = "int8" if args.bits == 8 else "int4"
        manifest = quantize_checkpoint(inspect_model_dir(path), args.out, mode, group_size=args.group_size,
                                       int4_head=args.int4_head or "int8", source=args.source, progress=True)
    except (ModelLoadError, ValueError) as exc:
        _progress(f"error: {exc}")
        return 2
    mib = manifest["weights_bytes"] / 2**20
    _progress(f"wrote {manifest['mode']} checkpoint to {args.out} ({mib:.1f} MiB "
              f"of weights; serve it with `lanner serve --model {args.out}`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lanner", description="OpenAI-compatible LLM server for CPUs")
    parser.add_argument("--version", action="version", version=f"lanner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_quantize(sub)
    p = sub.add_parser("make-demo-models", help="build the offline demo models")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the cache)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handler = {"serve": serve, "make-demo-models": make_demo_models, "quantize": quantize}[args.command]
    sys.exit(handler(args))
