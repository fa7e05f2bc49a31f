"""A pre-quantized int8/int4 Llama or Falcon checkpoint (`lanner quantize`) run without torch.

The torch-free worker's model: numpy arrays for the weights and the KV cache, lite.cpp (app/lite/native.py)
for the compute.  Loading reads each stored matrix of model.safetensors (and its int4 scales and zero points) in
blocks of rows, PACK_BYTES at a time, and packs each block into the kernels' tiles, allocated once (the same
bytes app/quant/kernels.py's `pack_int8` / `pack_int4` make; the tests compare them), so the process holds the
packed model plus one block in flight (no mapping of the file is kept).  A forward:

    embedding rows (int8 rows times their scales) -> lite.cpp's layer stack (every layer, KV cache writes and
    causal attention by position) -> the final norm of the rows whose logits are wanted -> the head (int8
    or int4 kernel) -> fp32 logits

The same model through the torch worker (app/models/llama.py, falcon.py with app/models/stack.py) differs only
where torch ran ATen ops: prompt chunks' attention (SDPA there, lite.cpp's decode attention here), LayerNorm
and GELU; tests/model/test_lite.py bounds the difference.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.lite import native
from app.models.arch import (
    PARALLEL,
    STACK_FALCON_ACTS,
    STACK_LAYOUTS,
    UnsupportedModelError,
    falcon_layout,
    falcon_num_kv_heads,
    llama_head_dim,
)
from app.models.loader import ModelInfo, ModelLoadError
from app.quant.manifest import MANIFEST_FILE, WEIGHTS_FILE, read_manifest
from app.quant.tiles import INT4_GROUP_SIZES, TILE, Rows, pack_int4, pack_int8

LLAMA_ACTS = ("silu", "swish")
KV_DTYPES = {"fp32": np.float32, "bf16": np.uint16}  # bf16 elements held as their 16 bits
_NP_DTYPES = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "I8": np.int8, "U8": np.uint8}


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> fp32, exactly."""
    return (a.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """The tensors of one safetensors file, each read on request into an array of its own (no mapping kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._base = 8 + size
        self.entries: dict[str, dict[str, Any]] = header

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> tuple[type, tuple[int, ...], int]:
        """(numpy dtype, shape, byte offset in the file) of the tensor `name` (bf16 as uint16 bits)."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(name)
        dtype = _NP_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which this loader "
                                 "does not read")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - start != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ModelLoadError(f"{self.path}: tensor {name} has {end - start} bytes for shape {list(shape)}")
        return dtype, shape, self._base + start

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor `name` (or its rows [r0, r1)) as a fresh array, read from the file (no mapping kept)."""
        dtype, shape, offset = self.entry(name)
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        row = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        out = np.empty((r1 - r0, *shape[1:]) if shape else (), dtype)
        with open(self.path, "rb") as f:
            f.seek(offset + r0 * row)
            if f.readinto(memoryview(out.reshape(-1)).cast("B")) != out.nbytes:
                raise ModelLoadError(f"{self.path} is truncated (tensor {name})")
        return out

    def plain(self, name: str) -> np.ndarray:
        """A norm weight or bias as fp32."""
        a = self.read(name)
        entry = self.entries[name]
        return bf16_to_f32(a) if entry["dtype"] == "BF16" else a.astype(np.float32)


# --------------------------------------------------------------------------- the kernels' tiles (app/quant/tiles.py)


@dataclass
class Linear:
    """A Linear in the kernels' tiles (kind 1 int8: weight, scales; kind 2 int4: weight, scales, zeros)."""

    kind: int
    n: int
    k: int
    group: int
    weight: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bias: np.ndarray | None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.kind == 1:
            y = native.int8_mm(x, self.weight, self.scales, self.n)
        else:
            y = native.int4_mm(x, self.weight, self.scales, self.zeros, self.group, self.n)
        if self.bias is not None:
            y += self.bias
        return y

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """An int8 Linear's weight rows `ids` dequantized [len(ids), K] fp32 (a tied model's embedding)."""
        q = self.weight[ids // TILE, :, ids % TILE, :].reshape(len(ids), -1)[:, :self.k]
        return q.astype(np.float32) * self.scales[ids, None]

    def arrays(self) -> list[np.ndarray | None]:
        return [self.weight, self.scales, self.zeros, self.bias]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays() if a is not None)


def _stored(file: SafetensorsFile, key: str, shape: tuple[int, ...], dtype: type, path: Path) -> str:
    """`key`, checked to be stored with this shape and dtype (bf16 as uint16)."""
    if key not in file:
        raise ModelLoadError(f"Pre-quantized model in {path} is missing tensor {key!r}.")
    got_dtype, got_shape, _ = file.entry(key)
    if got_shape != shape or got_dtype != dtype:
        raise ModelLoadError(f"Pre-quantized model in {path}: {key} is {np.dtype(got_dtype)} {list(got_shape)}, "
                             f"expected {np.dtype(dtype)} {list(shape)} for this config.")
    return key


def _linear(file: SafetensorsFile, name: str, entry: dict[str, Any], n: int, k: int, path: Path,
            bias: bool = False) -> Linear:
    """A stored Linear, checked against the config's shape (and whether it has a bias), packed into tiles block
    by block."""
    kind, g = entry.get("kind"), entry.get("group_size")

    def stored(suffix: str, shape: tuple[int, ...], dtype: type) -> str:
        return _stored(file, f"{name}.{suffix}", shape, dtype, path)

    def rows(key: str) -> Rows:
        return lambda r0, r1: file.read(key, (r0, r1))

    if entry.get("out_features") != n or entry.get("in_features") != k or bool(entry.get("bias")) != bias:
        raise ModelLoadError(f"Pre-quantized model in {path} does not match its config: {name} is "
                             f"{entry.get('out_features')} x {entry.get('in_features')}, bias {entry.get('bias')}; "
                             f"expected {n} x {k}, bias {bias}.")
    bias = file.read(stored("bias", (n,), np.float32)) if bias else None
    if kind == "int8":
        weight = stored("qweight", (n, k), np.int8)
        tiles, scales = pack_int8(rows(weight), bf16_to_f32(file.read(stored("scales", (n,), np.uint16))), n, k)
        return Linear(1, n, k, 0, tiles, scales, None, bias)
    if kind == "int4" and g in INT4_GROUP_SIZES and k % g == 0:
        scales = stored("scales", (n, k // g), np.uint16)
        zeros = stored("zeros", (n, k // g), np.uint8)

        def zero_rows(r0: int, r1: int) -> np.ndarray:
            z = file.read(zeros, (r0, r1))
            if z.size and int(z.max()) > 15:
                raise ModelLoadError(f"Pre-quantized model in {path}: {name}.zeros holds values above 15.")
            return z

        nib, sc, zp = pack_int4(rows(stored("qweight", (n, k // 2), np.uint8)),
                                lambda r0, r1: bf16_to_f32(file.read(scales, (r0, r1))), zero_rows, n, k, k // g)
        return Linear(2, n, k, g, nib, sc, zp, bias)
    raise ModelLoadError(f"Pre-quantized model in {path}: module {name!r} has an invalid kind/group size "
                         f"({kind!r}, {g!r}) for K={k}.")


class LiteModel:
    """The decoder of a pre-quantized checkpoint: numpy weights in the kernels' tiles, lite.cpp's compute."""

    def __init__(self, info: ModelInfo, manifest: dict[str, Any] | None = None) -> None:
        # manifest: the directory's, already checked by read_manifest (read here when not given)
        path, config = info.path, info.config
        manifest = manifest or read_manifest(path)
        if manifest.get("arch") != info.arch:
            raise ModelLoadError(f"Pre-quantized model in {path} was made for arch {manifest.get('arch')!r}, "
                                 f"but its config.json describes {info.arch!r}.")
        self.mode = manifest["mode"]
        self.arch = info.arch
        self.vocab_size = int(config.vocab_size)
        self.hidden = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        if info.arch == "llama":
            act = getattr(config, "hidden_act", "silu")
            if act not in LLAMA_ACTS:
                raise UnsupportedModelError(f"hidden_act {act!r} is not supported (supported: silu)")
            self.head_dim, self.num_kv_heads = llama_head_dim(config), int(config.num_key_value_heads)
            self.norm, self.layout, self.act, self.eps = 0, 0, 0, float(config.rms_norm_eps)
            self.inter = int(config.intermediate_size)
            names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
            mlp = (2 * self.inter, self.inter)
            attn_bias, mlp_bias = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
            biases = (attn_bias, attn_bias, mlp_bias, mlp_bias)
        elif info.arch == "falcon":
            act = getattr(config, "activation", "gelu")
            if act not in STACK_FALCON_ACTS:
                raise UnsupportedModelError(f"activation {act!r} is not supported (supported: {', '.join(STACK_FALCON_ACTS)})")
            self.head_dim, self.num_kv_heads = self.hidden // self.num_heads, falcon_num_kv_heads(config)
            self.norm, self.layout = 1, STACK_LAYOUTS[falcon_layout(config)]
            self.act, self.eps, self.inter = STACK_FALCON_ACTS[act], float(config.layer_norm_epsilon), 0
            names = ("qkv_proj", "o_proj", "up_proj", "down_proj")
            ffn = int(getattr(config, "ffn_hidden_size", None) or 4 * self.hidden)
            mlp = (ffn, ffn)
            biases = (bool(getattr(config, "bias", False)),) * 4
        else:
            raise UnsupportedModelError(f"architecture {info.arch!r} is not supported")
        h, d = self.hidden, self.head_dim
        shapes = {names[0]: ((self.num_heads + 2 * self.num_kv_heads) * d, h), names[1]: (h, self.num_heads * d),
                  names[2]: (mlp[0], h), names[3]: (h, mlp[1])}
        modules: dict[str, Any] = manifest["modules"]
        want = {"lm_head", *(f"layers.{i}.{m}" for i in range(self.num_layers) for m in names)}
        if set(modules) != want:
            diff = sorted(set(modules) ^ want)
            raise ModelLoadError(f"Pre-quantized model in {path} does not match its config: modules "
                                 f"{', '.join(diff[:5])} differ.")
        file = SafetensorsFile(path / WEIGHTS_FILE)
        self.head = _linear(file, "lm_head", modules["lm_head"], self.vocab_size, h, path)
        embedding = manifest.get("embedding")
        if embedding == "lm_head" and self.head.kind == 1:
            self.embed_q = self.embed_s = None  # rows of the head
        elif embedding == "int8":
            self.embed_q = file.read(_stored(file, "embed_tokens.qweight", (self.vocab_size, h), np.int8, path))
            self.embed_s = bf16_to_f32(file.read(_stored(file, "embed_tokens.scales", (self.vocab_size,), np.uint16,
                                                         path)))
        else:
            raise ModelLoadError(f"Pre-quantized model in {path} has no valid `embedding` in {MANIFEST_FILE} "
                                 f"(int8, or lm_head when the model is tied and its head int8): {embedding!r}.")

        def norm(name: str | None) -> np.ndarray | None:  # a norm's weight or bias: [hidden], stored
            if name is None:
                return None
            if name not in file:
                raise ModelLoadError(f"Pre-quantized model in {path} is missing tensor {name!r}.")
            a = file.plain(name)
            if a.shape != (h,):
                raise ModelLoadError(f"Pre-quantized model in {path}: {name} has shape {list(a.shape)}, expected "
                                     f"[{h}] for this config.")
            return np.ascontiguousarray(a)

        self.final_norm = tuple(map(norm, ("norm", None) if self.norm == 0 else ("ln_f.weight", "ln_f.bias")))
        self.layers: list[tuple[list[Linear], list[np.ndarray | None]]] = []
        for i in range(self.num_layers):
            linears = [_linear(file, f"layers.{i}.{m}", modules[f"layers.{i}.{m}"], *shapes[m], path, bias)
                       for m, bias in zip(names, biases)]
            if self.norm == 0:
                norm_names = (f"layers.{i}.input_norm", None, f"layers.{i}.post_attn_norm", None)
            else:  # Falcon's LayerNorms have biases; the parallel layout has no second norm
                norm_names = (f"layers.{i}.ln_attn.weight", f"layers.{i}.ln_attn.bias",
                              *((f"layers.{i}.ln_mlp.weight", f"layers.{i}.ln_mlp.bias")
                                if self.layout != STACK_LAYOUTS[PARALLEL] else (None, None)))
            self.layers.append((linears, [norm(n) for n in norm_names]))

    @property
    def weight_nbytes(self) -> int:
        norms = [a for _, ns in self.layers for a in ns if a is not None]
        embed = 0 if self.embed_q is None else self.embed_q.nbytes + self.embed_s.nbytes
        return (self.head.nbytes + embed + sum(l.nbytes for ls, _ in self.layers for l in ls)
                + sum(a.nbytes for a in norms))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [T, H] fp32."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if self.embed_q is None:
            return self.head.rows(ids)
        return self.embed_q[ids].astype(np.float32) * self.embed_s[ids, None]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Final norm and head of hidden states [R, H] -> logits [R, V] fp32."""
        w, b = self.final_norm
        return self.head(native.norm(x, w, b, self.eps, "rms" if self.norm == 0 else "layer"))

    def stack(self, k: list[np.ndarray], v: list[np.ndarray], bf16: bool) -> native.Stack:
        """lite.cpp's layer stack over these weights and the per-layer KV caches k, v [S, nkv, L, d]."""
        slots, _, max_len, _ = k[0].shape
        ints = [self.norm, self.layout, self.act, self.num_heads, self.num_kv_heads, self.head_dim, self.inter,
                self.num_layers, self.hidden, slots, max_len, int(bf16)]
        arrays: list[np.ndarray | None] = []
        for (linears, norms), kc, vc in zip(self.layers, k, v):
            for lin in linears:
                ints += [lin.kind, lin.group, lin.n]
                arrays += lin.arrays()
            arrays += [*norms, kc, vc]
        return native.Stack(ints, arrays, self.eps)
