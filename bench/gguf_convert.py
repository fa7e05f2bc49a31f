"""GGUF files of a bench model for llama.cpp, made by the converter that ships in llama-cpp-python's sdist.

    python bench/gguf_convert.py ~/.cache/lanner/bench-models/tinyllama-1.1b            # -> Q8_0, Q4_0
    python bench/gguf_convert.py MODEL_DIR --types q8_0,q4_0,f32 --out ~/.cache/lanner/gguf

Steps, all from the same safetensors file Lanner loads:

1. The converter. llama-cpp-python's sdist carries llama.cpp's `convert_hf_to_gguf.py` and `gguf-py` in
   `vendor/llama.cpp`; the installed wheel does not. We fetch the sdist of the *installed* version with pip
   (`pip download llama-cpp-python==X --no-binary :all: --no-deps`, the package index's own file) into
   `~/.cache/lanner/llama-cpp-sdist/` and unpack it once.
2. `convert_hf_to_gguf.py --outtype f32` writes an fp32 GGUF: the weights bit for bit.  A model stored in
   bf16 (`falcon-7b`, whose fp32 form would not fit the disk) is converted with `--outtype bf16`, again
   bit for bit, and has no f32 GGUF.
3. `llama_cpp.llama_model_quantize` (llama.cpp's `llama-quantize`, from the built library) turns that
   into Q8_0 and Q4_0 with llama.cpp's default rules for those file types (e.g. Q4_0 keeps
   `output.weight` at Q6_K). Quantizing from the source precision, not requantizing Q8_0, so both formats
   see the same weights. The intermediate GGUF is deleted afterwards unless `--keep-f32` (or f32 is asked
   for in `--types`).

The pre-tokenizer problem, and the fix used here
------------------------------------------------
For a BPE tokenizer the converter hashes the token ids of a fixed probe text
(`TextModel.get_vocab_base_pre`) and looks the hash up in a table of published tokenizers, to decide which
pre-tokenizer regex llama.cpp must use (`tokenizer.ggml.pre`). Our bench tokenizer is trained locally
(app/models/demo.py), so its hash is in no table and the converter stops with "BPE pre-tokenizer was not
recognized". The converter has no option for this; its own advice is to register the model in
`convert_hf_to_gguf_update.py`, which downloads the published tokenizers. We do the equivalent locally:
this script runs the converter in-process and wraps `get_vocab_base_pre` so that, when the original
raises, it checks what our `tokenizer.json` actually does before the BPE model runs, and answers with the
llama.cpp pre-tokenizer implementing exactly that:

* `pre_tokenizer` = ByteLevel(add_prefix_space=False, use_regex=True), no normalizer -> GPT-2's split
  regex then byte-to-unicode mapping = llama.cpp's `gpt-2` pre-tokenizer (LLAMA_VOCAB_PRE_TYPE_GPT2).

Anything else is refused (the original error is re-raised), so the wrapper cannot mislabel a tokenizer.
The tokenizer only matters for text; the benchmark feeds token ids. No tensor passes through this code.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

log = logging.getLogger("gguf_convert")

SDIST_CACHE = Path("~/.cache/lanner/llama-cpp-sdist").expanduser()
GGUF_CACHE = Path("~/.cache/lanner/gguf").expanduser()
QUANT_TYPES = {"q8_0": 7, "q4_0": 2}  # LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0 (llama.h)
MARKER_SUFFIX = ".source.json"


# --------------------------------------------------------------------------- the converter


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemExit("llama-cpp-python is not installed: pip install -e '.[bench]' "
                         "(builds llama.cpp from the sdist, ~8 min on 2 cores)") from exc


def ensure_sdist(cache: Path = SDIST_CACHE, version: str | None = None) -> Path:
    """The unpacked `vendor/llama.cpp` of the llama-cpp-python sdist matching the installed version."""
    version = version or llama_cpp_version()
    root = cache / f"llama_cpp_python-{version}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(cache)], check=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"
                   and not m.name.startswith(("/", ".."))]
        tar.extractall(cache, members=members, filter="data")
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{archive} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return tree


def pre_tokenizer_for(model_dir: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for the tokenizer.json in `model_dir`, if it is one we can vouch for."""
    try:
        tok = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pre, norm = tok.get("pre_tokenizer") or {}, tok.get("normalizer")
    if (tok.get("model", {}).get("type") == "BPE" and norm is None and pre.get("type") == "ByteLevel"
            and pre.get("add_prefix_space") is False and pre.get("use_regex", True) is True):
        return "gpt-2"
    return None


def _run_converter_in_process(tree: Path, argv: list[str]) -> None:
    """Import llama.cpp's converter from `tree`, wrap the pre-tokenizer lookup, and run its main()."""
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    import convert_hf_to_gguf  # noqa: PLC0415  (the sdist's converter)
    from conversion import base  # noqa: PLC0415

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_for(self.dir_model)
            if name is None:
                raise
            logging.getLogger("gguf_convert").warning(
                "pre-tokenizer hash not in the converter's table; tokenizer.json is a plain byte-level BPE "
                "(ByteLevel, GPT-2 regex, no prefix space, no normalizer): writing tokenizer.ggml.pre=%r", name)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    convert_hf_to_gguf.main()


# --------------------------------------------------------------------------- files


def _source_marker(model_dir: Path, version: str) -> dict[str, object]:
    st = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in sorted(Path(model_dir).glob("*.safetensors"))]
    recipe = Path(model_dir) / "lanner_bench.json"
    marker = {"model_dir": str(model_dir), "safetensors": st, "llama_cpp_python": version,
              "recipe": json.loads(recipe.read_text()) if recipe.is_file() else None}
    return json.loads(json.dumps(marker))  # as read back from the side file (lists, not tuples)


def _is_current(path: Path, marker: dict[str, object]) -> bool:
    side = path.with_name(path.name + MARKER_SUFFIX)
    try:
        return path.is_file() and json.loads(side.read_text()) == marker
    except (OSError, ValueError):
        return False


def _mark(path: Path, marker: dict[str, object]) -> None:
    path.with_name(path.name + MARKER_SUFFIX).write_text(json.dumps(marker, indent=2) + "\n")


def source_outtype(model_dir: Path) -> str:
    """The converter's lossless output type for `model_dir`: bf16 when every float matrix is stored in bf16,
    else f32."""
    from safetensors import safe_open  # noqa: PLC0415

    dtypes: set[str] = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as fh:  # reads the header only
            slices = (fh.get_slice(name) for name in fh.keys())
            dtypes |= {t.get_dtype() for t in slices if len(t.get_shape()) == 2}
    return "bf16" if dtypes == {"BF16"} else "f32"


def convert(model_dir: Path, out: Path, tree: Path, outtype: str = "f32") -> None:
    tmp = out.with_name(out.name + ".part")
    cmd = [sys.executable, __file__, "--_convert", str(tree), str(model_dir), "--outtype", outtype,
           "--outfile", str(tmp)]
    subprocess.run(cmd, check=True)
    os.replace(tmp, out)


def quantize(src: Path, out: Path, kind: str, nthread: int) -> None:
    """llama-quantize, from llama-cpp-python's library: `src` (f32 or bf16 GGUF) -> `out` of type `kind`."""
    import llama_cpp  # noqa: PLC0415

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = QUANT_TYPES[kind]
    tmp = out.with_name(out.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) returned {rc}")
    os.replace(tmp, out)


def ensure_ggufs(model_dir: Path, types: list[str], out_dir: Path = GGUF_CACHE, *, keep_f32: bool = False,
                 nthread: int | None = None) -> dict[str, Path]:
    """GGUF files of `model_dir` for each of `types` (f32, q8_0, q4_0), reused while the source is unchanged."""
    model_dir = Path(model_dir).expanduser().resolve()
    version = llama_cpp_version()
    marker = _source_marker(model_dir, version)
    out_dir = Path(out_dir).expanduser() / model_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {t: out_dir / f"{model_dir.name}-{t}.gguf" for t in types}
    todo = [t for t in types if not _is_current(paths[t], marker)]
    if not todo:
        return paths
    outtype = source_outtype(model_dir)
    if outtype != "f32" and "f32" in types:
        raise ValueError(f"{model_dir} is stored in {outtype}: there is no f32 GGUF of it")
    # the weights bit for bit: what Q8_0/Q4_0 are made from
    full = out_dir / f"{model_dir.name}-{outtype}.gguf"
    if not _is_current(full, marker):
        tree = ensure_sdist(version=version)
        t0 = time.perf_counter()
        convert(model_dir, full, tree, outtype)
        _mark(full, marker)
        log.info("converted %s -> %s in %.0f s", model_dir, full, time.perf_counter() - t0)
    for t in todo:
        if t == "f32":
            continue
        t0 = time.perf_counter()
        quantize(full, paths[t], t, nthread or len(os.sched_getaffinity(0)))
        _mark(paths[t], marker)
        log.info("quantized %s in %.0f s", paths[t].name, time.perf_counter() - t0)
    if not keep_f32 and "f32" not in types:
        full.unlink(missing_ok=True)
        full.with_name(full.name + MARKER_SUFFIX).unlink(missing_ok=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_convert":  # child: run the sdist's converter with the wrapped lookup
        _run_converter_in_process(Path(argv[1]), argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--types", default="q8_0,q4_0", help="comma list of f32, q8_0, q4_0")
    parser.add_argument("--out", type=Path, default=GGUF_CACHE)
    parser.add_argument("--keep-f32", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    bad = sorted(set(types) - {"f32", *QUANT_TYPES})
    if bad:
        parser.error(f"unknown type(s) {bad}")
    for t, p in ensure_ggufs(args.model_dir, types, args.out, keep_f32=args.keep_f32).items():
        print(f"{t}\t{p}\t{p.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
