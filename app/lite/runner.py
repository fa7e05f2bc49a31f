"""The torch-free runner (`runner: lite`): a pre-quantized int8/int4 checkpoint served by a worker process
that never imports torch, so it holds the model and the KV cache plus Python and numpy (~30 MiB) instead of
torch's ~220 MiB runtime (docs/engine.md, "Workers without torch").

The ModelRunner protocol of app/models/base.py, as app/models/runner.py's BatchedRunner: the same slot and
prefix bookkeeping (app/models/slots.py), a KV cache of one lazily resident array per layer and K/V
([slots, KV heads, max_model_len, head_dim], fp32 or bf16 bits), and one forward per step over the flat batch
of every input's fed tokens (app/lite/model.py).  Logits come back as a numpy array; the engine samples them
with app/lite/sampler.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from app.heap import lazy_zeros, trim_heap
from app.lite import native
from app.lite.model import KV_DTYPES, LiteModel
from app.models.arch import rope_inv_freq_np, rope_tables_np
from app.models.base import StepInput
from app.models.loader import ModelInfo, ModelLoadError
from app.models.slots import PrefixSlots, SlotPool
from app.quant.manifest import MANIFEST_FILE, is_quantized_dir, read_manifest

log = logging.getLogger("lanner.lite")


class LiteKV(SlotPool):
    """Per-layer K and V arrays [slots, KV heads, max_len, head_dim], resident where written."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, num_slots: int,
                 dtype: str) -> None:
        super().__init__(num_slots)
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]  # as torch names them (metrics, logs)
        self.k = [lazy_zeros(shape, KV_DTYPES[dtype]) for _ in range(num_layers)]
        self.v = [lazy_zeros(shape, KV_DTYPES[dtype]) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: str) -> int:
        return 2 * num_layers * num_kv_heads * max_len * head_dim * np.dtype(KV_DTYPES[dtype]).itemsize

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v))

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        for cache in (*self.k, *self.v):
            cache[dst, :, :n] = cache[src, :, :n]


@dataclass(frozen=True)
class LiteReport:
    """What the worker reports about its weights (the fields of app/quant/woq.py's QuantReport it reads)."""

    mode: str
    isa: str
    backend: str = "lite"
    kernel: str = "Lanner's kernels (standalone build, no torch)"


class LiteRunner(PrefixSlots):
    SAMPLER = "app.lite.sampler"  # EngineCore samples numpy logits with it

    def __init__(self, model: LiteModel, max_model_len: int, max_num_seqs: int, rope: tuple[np.ndarray, np.ndarray],
                 kv_cache_bytes: int | None = None, kv_dtype: str = "bf16") -> None:
        # rope: the cos and signed sin tables [max_model_len, head_dim] (app/models/arch.py's rope_tables_np)
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_model_len = int(max_model_len)
        per_slot = LiteKV.bytes_per_slot(model.num_layers, model.num_kv_heads, model.head_dim, self.max_model_len,
                                         kv_dtype)
        num_slots = LiteKV.slots_in_budget(kv_cache_bytes, max_num_seqs, per_slot, self.max_model_len)
        self.kv = LiteKV(model.num_layers, model.num_kv_heads, model.head_dim, self.max_model_len, num_slots,
                         kv_dtype)
        self.max_num_seqs = num_slots
        self._cos, self._sin = rope
        self._stack = model.stack(self.kv.k, self.kv.v, kv_dtype == "bf16")
        super().__init__(self.kv)

    def step(self, inputs: list[StepInput]) -> np.ndarray:
        """fp32 logits [rows, V]: inputs[i].num_logit_rows rows per input, in input order."""
        if not inputs:
            raise ValueError("step() needs at least one input")
        slots = self._slots_for(inputs)
        ids: list[int] = []
        positions: list[int] = []
        slot_ids: list[int] = []
        logit_rows: list[int] = []
        for inp, slot in zip(inputs, slots):
            n, start = len(inp.token_ids), inp.start_pos
            logit_rows.extend(range(len(ids) + n - inp.num_logit_rows, len(ids) + n))
            ids.extend(inp.token_ids)
            positions.extend(range(start, start + n))
            slot_ids.extend([slot] * n)
        pos = np.asarray(positions, dtype=np.int64)
        x = self.model.embed(np.asarray(ids, dtype=np.int64))
        self._stack.forward(x, self._cos[pos], self._sin[pos], np.asarray(slot_ids, dtype=np.int64), pos)
        logits = self.model.logits(x[logit_rows])
        self._record(inputs, slots)
        return logits


def load_lite_runner(info: ModelInfo, max_model_len: int, max_num_seqs: int, kv_cache_bytes: int | None = None,
                     quantize: str = "none", kv_cache_dtype: str = "auto") -> LiteRunner:
    """A LiteRunner for a pre-quantized directory (ModelLoadError for anything else)."""
    if not is_quantized_dir(info.path):
        raise ModelLoadError(f"runner: lite serves pre-quantized checkpoints only, and {info.path} is not one: "
                             "make one with `lanner quantize`, set quantize: int8|int4 (quantized once into the "
                             "cache), or use runner: batched")
    kv_dtype = "bf16" if kv_cache_dtype == "auto" else kv_cache_dtype
    if kv_dtype not in KV_DTYPES:
        raise ModelLoadError(f"kv_cache_dtype must be one of auto, {', '.join(KV_DTYPES)}, got {kv_cache_dtype!r}")
    manifest = read_manifest(info.path)
    if quantize not in ("none", manifest["mode"]):
        raise ModelLoadError(f"Model in {info.path} is a pre-quantized {manifest['mode']} checkpoint "
                             f"({MANIFEST_FILE}), but quantize={quantize} is configured. Set quantize to "
                             f"{manifest['mode']} (or leave it unset/none), or quantize the original model.")
    try:
        native.lib()  # before reading the weights: a library that cannot be built fails the load at once
        model = LiteModel(info, manifest)
        trim_heap()  # the packing's freed temporaries, still resident in the heap's holes
        rope = rope_tables_np(rope_inv_freq_np(info.config, model.head_dim), int(max_model_len))
        runner = LiteRunner(model, max_model_len, max_num_seqs, rope, kv_cache_bytes, kv_dtype)
        runner.quant_report = LiteReport(model.mode, native.isa())
    except native.LiteError as exc:
        raise ModelLoadError(f"runner: lite cannot run {info.path}: {exc}") from exc
    except KeyError as exc:
        raise ModelLoadError(f"Model in {info.path} is missing {exc.args[0]!r} (in its config or weights)") from exc
    except ValueError as exc:  # UnsupportedModelError, a KV budget too small for one sequence
        raise ModelLoadError(f"Model in {info.path} cannot be served: {exc}") from exc
    kinds = sorted({f"{m['kind']}" + (f" g{m['group_size']}" if m.get("group_size") else "")
                    for m in manifest["modules"].values()})
    log.info("%s: torch-free runner, %s weights %.1f MiB (%s; head %s; embedding %s), %s dot products; KV cache %s, "
             "%d slot(s) of %d tokens, %.1f MiB", info.path.name, model.mode, model.weight_nbytes / 2**20,
             ", ".join(kinds), manifest.get("head"), manifest.get("embedding"), native.isa(), kv_dtype,
             runner.kv.num_slots, runner.max_model_len, runner.kv.nbytes / 2**20)
    for fallback in manifest.get("fallbacks") or ():
        log.info("%s: stored as %s", info.path.name, fallback)
    return runner
