"""Pre-quantized (weight-only int8 / int4) checkpoints, and the streaming quantizer behind them.

Streaming algorithm (both `lanner quantize` and `serve` with `quantize: int8|int4` on an fp32 model)
---------------------------------------------------------------------------------------------------
The model is visited in parts: first the tensors outside the decoder layers (embedding, final norm,
output head), then one decoder layer at a time, through the same readers the fp32 loader uses
(`llama_global_readers` / `llama_layer_readers`, the falcon equivalents: names mapped, q/k/v and
gate/up fused, Falcon's QKV rows permuted).  Each source matrix of a Linear is read in a scope of its own
(`SourceScope`: the safetensors files memory-mapped, closed again after the read, so its pages leave the
process) and quantized to the portable form (`QuantizedWeight`, app/quant/woq.py) in blocks of rows;
a fused Linear is the row-wise concatenation of its parts' quantized rows (quantization is per row), so
no fused fp32 copy is ever made.  The token embedding becomes int8 per row the same way (woq.Int8Embedding;
nothing is read for it when the model is tied and its head int8: the embedding is then the head's rows).
The part's quantized Linears, its embedding and its unquantized tensors (norms) then go to a consumer;
inside a decoder layer each Linear goes on its own as soon as it is quantized (a part of one Linear, then
a last part with the layer's norms), so the consumer never holds a whole layer's quantized weights next
to what it builds from them (~200 MiB of int8 at falcon-7b's layer size):
* `SafetensorsWriter` (`lanner quantize`): appends them to the output file and drops them; the process
  holds one source matrix and the quantizer's temporaries at a time, never the model.
* `_Assembler` (serve): builds the Int8Linear / Int4Linear modules into a decoder created on the meta
  device and copies the unquantized tensors it keeps out of the mapping; peak memory is the quantized
  model plus one source matrix (the largest: the output head or embedding) and its quantizer's blocks.
Loading a pre-quantized directory runs the same assembler over the stored parts (no fp32 weight, no
re-quantization), so a checkpoint and quantize-at-load on the same source give bit-identical modules.

Directory format (FORMAT_VERSION 4)
-----------------------------------
A checkpoint is an ordinary model directory (config.json, tokenizer files, generation_config.json
copied unchanged) whose `model.safetensors` holds Lanner's decoder state dict (fused `qkv_proj`,
`gate_up_proj`; Falcon's QKV rows already in [q | k | v] order), with every Linear stored as:
    <module>.qweight   int8 [N, K] (int8)  |  uint8 [N, K/2] (int4; byte j = q[2j] | q[2j+1] << 4)
    <module>.scales    bf16 [N] (int8)     |  bf16 [N, K/G] (int4; per row codes 1..255 times a power of 2)
    <module>.zeros     uint8 [N, K/G] (int4 only: integer zero points 0..15; w = (q - zero) * scale)
    <module>.bias      fp32 [N] (when the layer has one)
the token embedding as int8 rows (manifest `embedding: int8`), or nothing when the model is tied and its
head int8 (`embedding: lm_head`: the embedding is the head's rows):
    embed_tokens.qweight  int8 [V, H];  embed_tokens.scales  bf16 [V];  row v = q[v] * scales[v]
and the other tensors (norms) under their state-dict names, unchanged in value (stored as bf16/fp16 when
that is lossless, else fp32).  The layouts are plain and CPU-independent: the kernels'
own layouts (Lanner's tiles of 16 rows, or ATen's ISA-dependent int4 packing) are made at load, so a
checkpoint made on AVX2 loads on AVX-512/AMX.
`lanner_quant.json` (the manifest, which is what marks a checkpoint -- never the file name) records the
format name/version and FORMAT_HASH (a hash of FORMAT_SPEC, the format description above), the Lanner
and torch versions, mode, group sizes, each module's kind and shape, the source, and the CPU it was made
on.  A manifest whose format version or hash differs from the running code is refused.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from app.models.falcon import FalconDecoder, falcon_global_readers, falcon_layer_readers, falcon_layout
from app.models.llama import LlamaDecoder, Reader, llama_global_readers, llama_layer_readers
from app.models.loader import ModelInfo, ModelLoadError
from app.heap import return_freed_memory_promptly, trim_heap  # noqa: F401 - re-exported
from app.quant.manifest import (  # noqa: F401 - re-exported
    FORMAT_HASH,
    FORMAT_NAME,
    FORMAT_SPEC,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    is_quantized_dir,
    read_manifest,
)
from app.quant.woq import (
    PackedWeight,
    QuantizedWeight,
    QuantReport,
    ReportBuilder,
    TilePacker,
    build_embedding,
    build_module,
    check_head,
    check_mode,
    embedding_kind,
    kernel_plan,
    linear_plan,
    pick_group_size,
    quantize_weight,
)

log = logging.getLogger("lanner.quant")

# Copied unchanged from the source directory when present.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                "merges.txt", "chat_template.jinja", "chat_template.json")

DECODER_PARTS = MappingProxyType({
    "llama": (LlamaDecoder, llama_global_readers, llama_layer_readers),
    "falcon": (FalconDecoder, falcon_global_readers, falcon_layer_readers),
})
GLOBAL_PART = "embeddings and head"
EMBEDDING = "embed_tokens"  # the decoders' token embedding module
HEAD = "lm_head"
EmbeddingPlan = QuantizedWeight | Literal["lm_head"] | None  # Part.embedding

SAFETENSORS_DTYPES = MappingProxyType({
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
})


# --------------------------------------------------------------------------- reading safetensors in scopes


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors shards of a model directory (from its index when there is one)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"Model in {path} has no safetensors weights (*.safetensors).")
    return files


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux (and most Unixes); None elsewhere
_libc_madvise = ctypes.CDLL(None, use_errno=True).madvise if _MADV_DONTNEED is not None else None
RELEASE_BLOCK_BYTES = 32 << 20  # rows copied (and their source pages released) at once by `detach`


class SourceScope(Mapping[str, torch.Tensor]):
    """Name -> tensor of a directory's shards, memory-mapped while the scope is open.

    safetensors maps a whole file and keeps every page read through it resident until the handle and
    every tensor read from it are gone; a scope per model part bounds that to one part.  `detach` gives a
    tensor that owns its memory (a copy if it still lives in the mapping), for what outlives the scope.
    """

    def __init__(self, file_of: Mapping[str, Path]) -> None:
        self._file_of = file_of
        self._handles: dict[Path, Any] = {}
        self._mapped: set[int] = set()  # storage addresses of the tensors handed out

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self._file_of[name]
        handle = self._handles.get(f)
        if handle is None:
            handle = self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        t = handle.get_tensor(name)
        self._mapped.add(t.untyped_storage().data_ptr())
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def detach(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """t (as `dtype`) in memory of its own.  A mapped tensor is copied a block of rows at a time, each
        block's source pages released as soon as it is copied, so a large one (a 1.2 GB fp32 embedding)
        is not resident twice."""
        dtype = dtype or t.dtype
        if t.untyped_storage().data_ptr() not in self._mapped:
            return t.to(dtype)
        if t.dim() < 2 or not t.is_contiguous():
            return t.to(dtype, copy=True)
        out = torch.empty(t.shape, dtype=dtype)
        step = max(1, RELEASE_BLOCK_BYTES // max(1, t[0].numel() * t.element_size()))
        for i in range(0, t.shape[0], step):
            out[i:i + step].copy_(t[i:i + step])
            self.release(t[i:i + step])
        return out

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages of `t`, a contiguous piece of a tensor in the mapping that nothing will
        read again (no-op for anything else).  The mapping is a private read-only-used file mapping, so
        MADV_DONTNEED only forgets pages: a later read would fault them in from the file again."""
        if (_MADV_DONTNEED is None or t.untyped_storage().data_ptr() not in self._mapped
                or not t.is_contiguous() or t.numel() == 0):
            return
        start = t.data_ptr()
        lo = -(-start // _PAGE) * _PAGE  # whole pages inside [start, end) only
        hi = (start + t.numel() * t.element_size()) // _PAGE * _PAGE
        if hi > lo:
            _libc_madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)

    def close(self) -> None:
        self._handles.clear()
        self._mapped.clear()


class SafetensorsSource:
    """A model directory's tensors, read part by part through `scope()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file_of: dict[str, Path] = {}
        for f in safetensors_files(self.path):
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    self.file_of[name] = f

    @contextmanager
    def scope(self) -> Iterator[SourceScope]:
        scope = SourceScope(self.file_of)
        try:
            yield scope
        finally:
            scope.close()


# --------------------------------------------------------------------------- writing safetensors as a stream


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor without keeping the tensors.

    Data goes to one spool file per element size; `close` writes the header, then the spools largest
    element size first, so every tensor is aligned to its element size (as safetensors' own writer
    arranges it) and the data has no holes.  Copying the spools goes through a small buffer.
    """

    def __init__(self, path: Path, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._spools: dict[int, IO[bytes]] = {}
        self._sizes: dict[int, int] = {}
        # name -> (dtype, shape, itemsize, start, end in its spool)
        self._entries: dict[str, tuple[str, list[int], int, int, int]] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().contiguous()
        size = t.element_size()
        spool = self._spools.get(size)
        if spool is None:
            spool = self._spools[size] = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115
        raw = t.reshape(-1).view(torch.uint8).numpy()
        start = self._sizes.get(size, 0)
        spool.write(memoryview(raw))
        self._sizes[size] = start + raw.nbytes
        self._entries[name] = (SAFETENSORS_DTYPES[t.dtype], list(t.shape), size, start, start + raw.nbytes)
        self.nbytes += raw.nbytes

    def close(self) -> None:
        order = sorted(self._spools, reverse=True)
        base, offset = {}, 0
        for size in order:
            base[size] = offset
            offset += self._sizes[size]
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        for name in sorted(self._entries):
            dtype, shape, size, start, end = self._entries[name]
            offsets = [base[size] + start, base[size] + end]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for size in order:
                spool = self._spools.pop(size)
                spool.seek(0)
                shutil.copyfileobj(spool, out, 1 << 22)
                spool.close()
            out.flush()
            os.fsync(out.fileno())  # on disk before the directory is renamed into place (`_durable_replace`)

    def abort(self) -> None:
        for spool in self._spools.values():
            spool.close()
        self._spools.clear()


# --------------------------------------------------------------------------- the parts of a model


@dataclass
class Part:
    """One part of a model: its unquantized tensors (state-dict names) and its quantized Linears."""

    label: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    linears: dict[str, QuantizedWeight | PackedWeight] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # module -> why it is not quantized as asked
    # the int8 token embedding: its table, "lm_head" (tied: the int8 head's rows), None (not in this part)
    embedding: EmbeddingPlan = None
    detach: Callable[..., torch.Tensor] = lambda t, dtype=None: t.to(dtype or t.dtype)  # owned copy (SourceScope)


def meta_decoder(info: ModelInfo) -> nn.Module:
    cls = DECODER_PARTS[info.arch][0]
    with torch.device("meta"):
        return cls(info.config)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    """Linear module name -> (out_features, in_features, has bias)."""
    return {name: (m.out_features, m.in_features, m.bias is not None)
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def stream_quantized_parts(info: ModelInfo, mode: Literal["int8", "int4"], consume: Callable[[Part], None], *,
                           group_size: int | None = None, int4_head: Literal["int8", "int4"] = "int8",
                           pack_modes: Collection[str] = (),
                           progress: Callable[[str], None] | None = None) -> None:
    """Quantize the model in `info.path` part by part (see the module comment); `consume` gets each part
    while the scope of its unquantized tensors is open and must copy (`part.detach`) what it keeps.

    Inside a part each source matrix is read in a scope of its own and quantized, and the scope closed
    before the next one is read; fused Linears (q|k|v, gate|up) are quantized part by part and their
    quantized rows concatenated (quantization is per row), so no fused fp32 copy is made and at most one
    source matrix is resident.

    Linears of a mode in `pack_modes` (the loader's, when Lanner's kernels run them) are quantized
    straight into Lanner's tiles (`TilePacker`, a `PackedWeight` in the part): the whole matrix's portable
    form is never made, so it is never held next to its tiles (falcon-7b's largest Linear: 79 MiB int8)."""
    check_head(int4_head)
    _, global_readers, layer_readers = DECODER_PARTS[info.arch]
    if info.arch == "falcon":
        falcon_layout(info.config)  # refuses unsupported layouts before any weight is read
    shapes = linear_shapes(meta_decoder(info))
    source = SafetensorsSource(info.path)
    config = info.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    parts: list[tuple[str, dict[str, Reader]]] = [(GLOBAL_PART, global_readers(config))]
    parts += [(f"layer {i}", layer_readers(config, i)) for i in range(config.num_hidden_layers)]
    for label, readers in parts:
        part = Part(label)
        alone = label != GLOBAL_PART  # a layer's Linears go to the consumer one by one (the module comment)
        for module in [m for m in shapes if f"{m}.weight" in readers]:
            kind, g, fallback = linear_plan(module, shapes[module][1], mode, group_size, int4_head)
            weight_reader = readers.pop(f"{module}.weight")
            blocks: list[QuantizedWeight] = []
            packer = TilePacker(kind, *shapes[module][:2], g) if kind in pack_modes else None
            for piece in getattr(weight_reader, "parts", (weight_reader,)):  # q, k, v / gate, up: in turn
                with source.scope() as weights:  # source pages released block by block as quantized
                    if packer is not None:
                        packer.add(piece(weights), release=weights.release)
                    else:
                        blocks.append(quantize_weight(piece(weights), kind, g, release=weights.release))
            bias_reader = readers.pop(f"{module}.bias", None)
            with source.scope() as weights:
                bias = None if bias_reader is None else bias_reader(weights).to(torch.float32, copy=True)
            target = Part(label) if alone else part
            if packer is not None:
                target.linears[module] = packer.finish(bias)
            else:
                target.linears[module] = QuantizedWeight.cat(blocks, bias) if len(blocks) > 1 else replace(
                    blocks[0], bias=bias)
            del blocks, bias, packer
            if fallback:
                target.fallbacks[module] = fallback
            if alone:
                consume(target)
            del target
            trim_heap()  # the quantizer's (and the consumer's) freed blocks, before the next matrix is read
        embed_reader = readers.pop(f"{EMBEDDING}.weight", None)
        if embed_reader is not None:
            # (no local name for the head's weight: it would stay alive, and resident, for the whole load)
            if tied and getattr(part.linears.get(HEAD), "mode", None) == "int8":
                part.embedding = "lm_head"  # the same matrix, quantized the same way per row: not read again
            else:
                with source.scope() as weights:
                    part.embedding = quantize_weight(embed_reader(weights), "int8", release=weights.release)
                trim_heap()
        with source.scope() as weights:
            part.tensors = {name: reader(weights) for name, reader in readers.items()}
            part.detach = weights.detach
            consume(part)
            del part
        trim_heap()
        if progress is not None:
            progress(label)


# --------------------------------------------------------------------------- assembling a decoder


class _Assembler:
    """Builds a decoder from parts: WOQ modules from the quantized Linears, unquantized tensors assigned
    into a model created on the meta device (no throw-away allocation)."""

    def __init__(self, info: ModelInfo, mode: str, kernel: str, backend: str = "native") -> None:
        self.info = info
        self.plan = kernel_plan(mode, kernel, backend=backend)  # checks the backend before any weight is read
        self.model = meta_decoder(info)
        self.report = ReportBuilder(mode, self.plan)

    def __call__(self, part: Part) -> None:
        head_qw = part.linears[HEAD] if isinstance(part.embedding, str) else None
        for name in list(part.linears):
            qw = part.linears.pop(name)  # freed once its module is built (the tiles are a new tensor)
            if qw.mode == "int8" and "int8" not in self.plan.own:
                # ATen's Int8Linear keeps these tensors: they must not live in the mapping (Lanner's tiles
                # are a new tensor anyway)
                qw = replace(qw, qweight=part.detach(qw.qweight), scales=part.detach(qw.scales))
            qw = replace(qw, bias=None if qw.bias is None else part.detach(qw.bias))
            module = build_module(qw, self.plan)
            self.report.add(name, qw, module, part.fallbacks.get(name))
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, module)
        if part.embedding is not None:
            self._embedding(part, head_qw)
        if not part.tensors:  # a part of one Linear (a layer's, streamed on its own)
            return
        tensors = {name: part.detach(t, torch.float32) for name, t in part.tensors.items()}
        result = self.model.load_state_dict(tensors, strict=False, assign=True)
        if result.unexpected_keys:
            raise ModelLoadError(f"Weights of {self.info.path} have tensors the {self.info.arch} decoder "
                                 f"does not know: {', '.join(sorted(result.unexpected_keys)[:5])}")

    def _embedding(self, part: Part, head_qw: QuantizedWeight | PackedWeight | None) -> None:
        tied = isinstance(part.embedding, str)  # HEAD: the int8 head's rows, if its module hands them out
        qw = head_qw if tied else part.embedding
        assert isinstance(qw, (QuantizedWeight, PackedWeight)) and qw.mode == "int8"
        module = build_embedding(qw, self.model.get_submodule(HEAD) if tied else None, detach=part.detach)
        setattr(self.model, EMBEDDING, module)
        self.report.embedding = embedding_kind(module)
        part.embedding = None

    def finish(self) -> tuple[nn.Module, QuantReport]:
        tensors = (*self.model.named_parameters(), *self.model.named_buffers())
        missing = [name for name, t in tensors if t.is_meta]
        if missing:
            raise ModelLoadError(f"Model in {self.info.path} is missing weights: {', '.join(missing[:5])}"
                                 + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        return self.model.eval(), self.report.build()


def load_and_quantize(info: ModelInfo, mode: Literal["int8", "int4"], *, group_size: int | None = None,
                      int4_head: Literal["int8", "int4"] = "int8", kernel: str = "auto",
                      backend: str = "native") -> tuple[nn.Module, QuantReport]:
    """The decoder of an fp32 (or bf16/fp16) checkpoint, quantized while it is read, part by part; its
    Linears become `backend`'s WOQ modules (app/quant/backends)."""
    check_mode(mode)
    assembler = _Assembler(info, mode, kernel, backend)
    stream_quantized_parts(info, mode, assembler, group_size=group_size, int4_head=int4_head,
                           pack_modes=assembler.plan.own if assembler.plan.impl is None else ())
    return assembler.finish()


# --------------------------------------------------------------------------- pre-quantized directories


def _stored_weight(name: str, entry: Mapping[str, Any], weights: SourceScope,
                   shape: tuple[int, int, bool], path: Path) -> QuantizedWeight:
    """A stored Linear's portable weight, checked against the decoder's shape."""
    n, k, has_bias = shape
    kind, g = entry.get("kind"), entry.get("group_size")

    def get(suffix: str) -> torch.Tensor:
        key = f"{name}.{suffix}"
        if key not in weights:
            raise ModelLoadError(f"Pre-quantized model in {path} is missing tensor {key!r}.")
        return weights[key]

    if kind == "int8":
        qw = QuantizedWeight("int8", get("qweight"), get("scales"), None,
                             get("bias") if has_bias else None, k)
        want = {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.bfloat16)}
    elif kind == "int4" and isinstance(g, int) and pick_group_size(k, g) == g:
        qw = QuantizedWeight("int4", get("qweight"), get("scales"), get("zeros"),
                             get("bias") if has_bias else None, k, g)
        want = {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, k // g), torch.bfloat16),
                "zeros": ((n, k // g), torch.uint8)}
    else:
        raise ModelLoadError(f"Pre-quantized model in {path}: module {name!r} has an invalid kind/group size "
                             f"({kind!r}, {g!r}) for K={k}.")
    if has_bias:
        want["bias"] = ((n,), torch.float32)
    for attr, (want_shape, dtype) in want.items():
        t = getattr(qw, attr)
        if tuple(t.shape) != want_shape or t.dtype != dtype:
            raise ModelLoadError(f"Pre-quantized model in {path}: {name}.{attr} is {t.dtype} "
                                 f"{list(t.shape)}, "
                                 f"expected {dtype} {list(want_shape)} for this config.")
    if qw.zeros is not None and qw.zeros.numel() and int(qw.zeros.max()) > 15:  # they are packed as nibbles
        raise ModelLoadError(f"Pre-quantized model in {path}: {name}.zeros holds values above 15; int4 zero "
                             "points are 0..15.")
    return qw


def load_quantized(info: ModelInfo, quantize: str = "none", *, kernel: str = "auto",
                   backend: str = "native") -> tuple[nn.Module, QuantReport]:
    """The decoder of a pre-quantized directory, built from its stored tensors (no fp32, no re-quantizing)
    as `backend`'s WOQ modules (the stored tensors are portable: any backend loads them).

    `quantize` is the configured mode: "none" takes the checkpoint's, anything else must equal it."""
    manifest = read_manifest(info.path)
    mode = manifest["mode"]
    if quantize not in ("none", mode):
        raise ModelLoadError(
            f"Model in {info.path} is a pre-quantized {mode} checkpoint ({MANIFEST_FILE}), but "
            f"quantize={quantize} is configured. Set quantize to {mode} (or leave it unset/none), or "
            "quantize the original model.")
    if manifest.get("arch") != info.arch:
        raise ModelLoadError(f"Pre-quantized model in {info.path} was made for arch "
                             f"{manifest.get('arch')!r}, "
                             f"but its config.json describes {info.arch!r}.")
    assembler = _Assembler(info, mode, kernel, backend)
    shapes = linear_shapes(assembler.model)
    table = assembler.model.get_submodule(EMBEDDING)
    vocab_and_hidden = (table.num_embeddings, table.embedding_dim)
    modules: dict[str, Any] = manifest["modules"]
    if set(modules) != set(shapes):
        diff = sorted(set(modules) ^ set(shapes))
        raise ModelLoadError(f"Pre-quantized model in {info.path} does not match its config: modules "
                             f"{', '.join(diff[:5])} differ.")
    embedding = manifest.get("embedding")
    if embedding not in ("int8", HEAD) or (embedding == HEAD and modules.get(HEAD, {}).get("kind") != "int8"):
        raise ModelLoadError(f"Pre-quantized model in {info.path} has no valid `embedding` in {MANIFEST_FILE} "
                             f"(int8, or lm_head when the model is tied and its head int8): {embedding!r}.")
    source = SafetensorsSource(info.path)
    stored = {f"{m}.{s}" for m in (*modules, EMBEDDING) for s in ("qweight", "scales", "zeros", "bias")}
    plain = [name for name in source.file_of if name not in stored]
    groups: dict[str, list[str]] = {}  # part label -> module names / tensor names
    for name in (*modules, *plain):
        groups.setdefault(_part_of(name), []).append(name)
    for label in sorted(groups, key=_part_order):
        names = groups[label]
        # a layer's Linears one by one, each in a scope of its own (as when quantizing), then its norms
        batches = [names] if label == GLOBAL_PART else [
            *([n] for n in names if n in modules), [n for n in names if n not in modules]]
        for batch in batches:
            with source.scope() as weights:
                part = Part(label, detach=weights.detach)
                for name in batch:
                    if name in modules:
                        part.linears[name] = _stored_weight(name, modules[name], weights, shapes[name], info.path)
                    else:
                        part.tensors[name] = weights[name]
                if label == GLOBAL_PART:
                    part.embedding = HEAD if embedding == HEAD else _stored_weight(
                        EMBEDDING, {"kind": "int8"}, weights, (*vocab_and_hidden, False), info.path)
                assembler(part)
                del part
        trim_heap()
    model, report = assembler.finish()
    return model, replace(report, fallbacks=tuple(manifest.get("fallbacks", ())))


def _part_of(name: str) -> str:
    if name.startswith("layers."):
        return f"layer {name.split('.')[1]}"
    return GLOBAL_PART


def _part_order(label: str) -> tuple[int, int]:
    return (0, 0) if label == GLOBAL_PART else (1, int(label.split()[1]))


# --------------------------------------------------------------------------- `lanner quantize`


def _compact(t: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor as bf16 or fp16 when that keeps every value exactly, else itself (checked in chunks)."""
    if t.dtype != torch.float32 or t.numel() == 0:
        return t
    flat = t.reshape(-1)
    step = 1 << 22
    for dtype in (torch.bfloat16, torch.float16):
        chunks = (flat[i:i + step] for i in range(0, flat.numel(), step))
        if all(torch.equal(c.to(dtype).float(), c) for c in chunks):
            return t.to(dtype)
    return t


def _quantized_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    out = {f"{name}.qweight": qw.qweight, f"{name}.scales": qw.scales.to(torch.bfloat16)}
    if qw.zeros is not None:
        out[f"{name}.zeros"] = qw.zeros.to(torch.uint8)
    if qw.bias is not None:
        out[f"{name}.bias"] = qw.bias.float()
    return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(tmp: Path, out: Path) -> None:
    """Rename the finished directory `tmp` to `out` so that a crash (power loss included) leaves either no
    `out` or a complete one: its files and the directory itself reach the disk before the rename, the rename
    before we return.  (The weights file was synced as it was closed.)"""
    for f in tmp.iterdir():
        if f.is_file() and f.name != WEIGHTS_FILE:
            _fsync_path(f)
    _fsync_path(tmp)
    os.replace(tmp, out)
    _fsync_path(out.parent)


def quantize_checkpoint(info: ModelInfo, out: Path, mode: Literal["int8", "int4"], *,
                        group_size: int | None = None, int4_head: Literal["int8", "int4"] = "int8",
                        source: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Write a pre-quantized copy of the model in `info.path` to the directory `out` (created; it must not
    exist or be empty) and return its manifest.  Streams part by part (see the module comment)."""
    from app import __version__
    from app.quant.isa import detect_isa

    check_mode(mode)
    if mode == "none":
        raise ValueError("quantize mode must be int8 or int4")
    if is_quantized_dir(info.path):
        raise ModelLoadError(f"Model in {info.path} is already a Lanner pre-quantized checkpoint; "
                             "quantize the original model instead.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"Output {out} already exists and is not an empty directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    num_parts = info.config.num_hidden_layers + 1
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    writer = SafetensorsWriter(tmp / WEIGHTS_FILE, metadata={"format": "pt", "lanner": MANIFEST_FILE})
    modules: dict[str, dict[str, Any]] = {}
    fallbacks: list[str] = []
    embedding: list[str] = []
    fp32_bytes = 0

    def write(part: Part) -> None:
        nonlocal fp32_bytes
        for name, qw in part.linears.items():
            for key, t in _quantized_tensors(name, qw).items():
                writer.add(key, t)
            modules[name] = {"kind": qw.mode, "out_features": qw.out_features, "in_features": qw.in_features,
                             "group_size": qw.group_size, "bias": qw.bias is not None}
            fp32_bytes += qw.fp32_nbytes
        fallbacks.extend(part.fallbacks.values())
        if isinstance(part.embedding, QuantizedWeight):
            for key, t in _quantized_tensors(EMBEDDING, part.embedding).items():
                writer.add(key, t)
            embedding.append("int8")
        elif part.embedding is not None:
            embedding.append(HEAD)
        for name, t in part.tensors.items():
            writer.add(name, _compact(t))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_parts, desc=f"quantize {mode}", unit="part")
    t0 = time.perf_counter()
    try:
        stream_quantized_parts(info, mode, write, group_size=group_size, int4_head=int4_head,
                               progress=(lambda label: bar.update(1)) if bar is not None else None)
        writer.close()
        for name in COPIED_FILES:
            if (info.path / name).is_file():
                shutil.copy2(info.path / name, tmp / name)
        kinds = {m["kind"] for m in modules.values()}
        manifest = {
            "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION, "hash": FORMAT_HASH},
            "lanner_version": __version__,
            "torch_version": torch.__version__,
            "mode": mode,
            "arch": info.arch,
            "group_size": group_size,  # as requested (None: the default, woq.DEFAULT_GROUP_SIZE)
            "group_sizes": sorted({m["group_size"] for m in modules.values() if m["group_size"]}),
            "kinds": sorted(kinds),
            "head": modules.get("lm_head", {}).get("kind"),
            "embedding": embedding[0] if embedding else None,  # int8 | lm_head (tied: the head's rows)
            "fallbacks": fallbacks,
            "source": {"name": source or str(info.path), "path": str(info.path)},
            "isa": detect_isa().describe(),
            "created_unix": int(time.time()),
            "seconds": round(time.perf_counter() - t0, 2),
            "fp32_linear_bytes": fp32_bytes,
            "weights_bytes": writer.nbytes,
            "files": [WEIGHTS_FILE],
            "modules": modules,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        _durable_replace(tmp, out)
    except BaseException as exc:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, KeyError):
            raise ModelLoadError(f"Model in {info.path} is missing weight {exc.args[0]!r} in its safetensors "
                                 "files") from exc
        raise
    finally:
        if bar is not None:
            bar.close()
    return manifest
