"""The batched runner: Lanner's own Llama/Falcon decoders over a slot KV cache, one forward per step.

Algorithm of `BatchedRunner.step` (the ModelRunner protocol of base.py)
----------------------------------------------------------------------
1. Each input's seq_id gets a KV slot on its first step (start_pos must then be 0) and keeps it until
   `free`. The runner tracks how many tokens each sequence has cached and refuses an input whose
   start_pos disagrees (out of step) or that would pass max_model_len.
2. Inputs are laid out as one flat batch: single-token inputs first, sorted by slot (so the decode
   attention reads a packed slot range without copying), then multi-token prompt chunks in the given
   order. Token ids, positions, slots, rope cos/sin and the row of each input's last token are built
   once here; `KVCache.plan` adds the attention masks. Layers only read these.
3. The decoder runs once over the flat batch and returns fp32 logits of each input's last token, in the
   caller's input order (rows of mid-prompt chunks are computed too; the engine ignores them).

`load_runner` builds the decoder for a checked model directory straight from its safetensors files
(memory-mapped, read tensor by tensor; q/k/v and gate/up fused at load), on the meta device first so no
throw-away random weights are ever allocated.  With `quantize: int8|int4` the weights are quantized while
they are read, one decoder layer at a time, so the fp32 model is never held; a pre-quantized directory
(`lanner quantize`, marked by its lanner_quant.json) is built from its stored int8/int4 tensors
(app/quant/checkpoint.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open
from torch import nn

from app.models import ops, stack
from app.models.base import StepInput
from app.models.falcon import FalconDecoder, falcon_state_dict
from app.models.kv_cache import KVCache
from app.models.slots import PrefixSlots
from app.models.llama import LlamaDecoder, UnsupportedModelError, llama_state_dict, rope_inv_freq, rope_tables
from app.models.loader import ModelInfo, ModelLoadError
from app.quant.checkpoint import is_quantized_dir, load_and_quantize, load_quantized
from app.quant.backends import WoqBackendUnavailable
from app.quant.woq import QuantReport, check_backend, check_mode

log = logging.getLogger("lanner.models")

DECODERS = MappingProxyType({
    "llama": (LlamaDecoder, llama_state_dict),
    "falcon": (FalconDecoder, falcon_state_dict),
})


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Lazy name -> tensor view of a model directory's safetensors shards (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"Model in {path} has no safetensors weights (*.safetensors).")
        self._where = {}
        for f in files:
            handle = safe_open(str(f), framework="pt", device="cpu")
            for name in handle.keys():
                self._where[name] = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def build_decoder(arch: str, config, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Our decoder for `arch` with the transformers-named `weights` (fp32, fused), in eval mode."""
    cls, to_state_dict = DECODERS[arch]
    with torch.device("meta"):
        model = cls(config)
    state = to_state_dict(config, weights)
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


class BatchedRunner(PrefixSlots):
    def __init__(self, model: nn.Module, max_model_len: int, max_num_seqs: int,
                 kv_cache_bytes: int | None = None, kv_dtype: torch.dtype = torch.float32) -> None:
        self.model = model.eval()
        self.vocab_size = int(model.vocab_size)
        self.max_model_len = int(max_model_len)
        num_slots = KVCache.slots_for_budget(kv_cache_bytes, max_num_seqs, model.num_layers,
                                             model.num_kv_heads, model.head_dim, self.max_model_len, kv_dtype)
        self.kv = KVCache(model.num_layers, model.num_kv_heads, model.head_dim, self.max_model_len, num_slots,
                          kv_dtype)
        self.max_num_seqs = num_slots
        self._cos, self._sin = rope_tables(rope_inv_freq(model.config, model.head_dim), self.max_model_len)
        PrefixSlots.__init__(self, self.kv)
        self.quant_report = QuantReport(mode="none")  # set by load_runner when weights are quantized

    @torch.inference_mode()
    def step(self, inputs: list[StepInput]) -> torch.Tensor:
        # returns logits fp32: inputs[i].num_logit_rows rows per input in input order (the last fed token's)
        if not inputs:
            raise ValueError("step() needs at least one input")
        slots = self._slots_for(inputs)
        decode = sorted((i for i, inp in enumerate(inputs) if len(inp.token_ids) == 1), key=slots.__getitem__)
        prefill = [i for i, inp in enumerate(inputs) if len(inp.token_ids) > 1]
        ids: list[int] = []
        positions: list[int] = []
        slot_ids: list[int] = []
        rows: list[tuple[int, int, int]] = []
        out_rows: list[range] = [range(0)] * len(inputs)  # flat rows whose logits input i gets
        for i in decode + prefill:
            inp, slot = inputs[i], slots[i]
            n, start = len(inp.token_ids), inp.start_pos
            out_rows[i] = range(len(ids) + n - inp.num_logit_rows, len(ids) + n)
            ids.extend(inp.token_ids)
            positions.extend(range(start, start + n))
            slot_ids.extend([slot] * n)
            rows.append((slot, start, n))
        pos = torch.tensor(positions)
        logit_rows = torch.tensor([r for rs in out_rows for r in rs])
        meta = self.kv.plan(rows, cos=self._cos[pos].unsqueeze(1), sin=self._sin[pos].unsqueeze(1),
                            logit_rows=logit_rows, positions=pos, slot_ids=torch.tensor(slot_ids))
        logits = self.model(torch.tensor(ids), meta, self.kv)
        self._record(inputs, slots)
        return logits


KV_DTYPES = MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16})
KV_DTYPE_NAMES = MappingProxyType({v: k for k, v in KV_DTYPES.items()})


def resolve_kv_dtype(kv_cache_dtype: str, quantize: str) -> torch.dtype:
    """The KV cache dtype for a `kv_cache_dtype` setting and the model's quantization mode: "auto" is bf16 for
    an int8/int4 model (its weights already differ from fp32 by more than bf16 keys and values add, see
    tests/model/test_woq_accuracy.py) and fp32 for an unquantized one (exact against transformers)."""
    if kv_cache_dtype == "auto":
        return torch.bfloat16 if quantize != "none" else torch.float32
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_DTYPES)}, got {kv_cache_dtype!r}")
    return KV_DTYPES[kv_cache_dtype]


def load_runner(info: ModelInfo, max_model_len: int, max_num_seqs: int,
                kv_cache_bytes: int | None = None, quantize: str = "none",
                woq_backend: str = "native", int4_group_size: int | None = None,
                kv_cache_dtype: str = "auto", int4_head: str = "int8") -> BatchedRunner:
    """A BatchedRunner for a checked model directory, weights read from its safetensors files.

    `quantize` (none|int8|int4, from the model's config) builds every Linear as its weight-only-quantized
    module (app/quant/woq.py), quantizing layer by layer as the weights are read; a pre-quantized
    directory is loaded as stored, and then `quantize` must be none (take the checkpoint's mode) or equal
    to its mode.  `woq_backend` (native|torchao|ipex, app/quant/backends) decides whose modules run the
    quantized layers; an optional backend that cannot run here is a ModelLoadError saying what to install.
    `int4_group_size` (32/64/128/256, default 32) and `int4_head` (int8|int4: the output head) apply when
    quantizing to int4 at load; a pre-quantized directory keeps the group sizes and head it was written
    with.  The report is kept on the runner as `quant_report`.  `kv_cache_dtype` (auto|fp32|bf16): auto is
    bf16 for a quantized model, fp32 otherwise.
    """
    try:
        check_mode(quantize)
        check_backend(woq_backend)
        if is_quantized_dir(info.path):
            model, report = load_quantized(info, quantize, backend=woq_backend)
        elif quantize != "none":
            model, report = load_and_quantize(info, quantize, backend=woq_backend,  # type: ignore[arg-type]
                                              group_size=int4_group_size if quantize == "int4" else None,
                                              int4_head=int4_head)  # type: ignore[arg-type]
        else:
            if woq_backend != "native":
                log.warning("woq_backend=%s has no effect: %s is not quantized (quantize: none)", woq_backend,
                            info.path)
            model = build_decoder(info.arch, info.config, SafetensorsWeights(info.path))
            report = QuantReport("none")
        kv_dtype = resolve_kv_dtype(kv_cache_dtype, report.mode)
        runner = BatchedRunner(model, max_model_len, max_num_seqs, kv_cache_bytes, kv_dtype)
        runner.quant_report = report
        log.info("%s: KV cache %s, %d slot(s) of %d tokens, %.1f MiB", info.path.name, KV_DTYPE_NAMES[kv_dtype],
                 runner.kv.num_slots, runner.max_model_len, runner.kv.nbytes / 2**20)
        # built (once per machine) while loading, not in the first step
        log.info("%s: RMSNorm, RoPE + KV store and decode attention run as %s", info.path.name,
                 "Lanner's C++ ops" if ops.own_ops() else "ATen ops (Lanner's kernels are not built)")
        if runner.model.stack_cache.get(runner.model, runner.kv) is not None:
            log.info("%s: every decoder layer of a step runs in one C++ call (app/models/stack.py)",
                     info.path.name)
        else:
            log.info("%s: decoder layers run one by one from Python (%s)", info.path.name,
                     stack.why_not(runner.model))
        return runner
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"Model in {info.path} cannot be served: {exc}") from exc
    except WoqBackendUnavailable as exc:
        raise ModelLoadError(str(exc)) from exc
    except ValueError as exc:  # e.g. a KV budget too small for one sequence
        raise ModelLoadError(str(exc)) from exc
    except KeyError as exc:
        raise ModelLoadError(f"Model in {info.path} is missing weight {exc.args[0]!r} "
                             "in its safetensors files") from exc
    except RuntimeError as exc:  # shape mismatches from load_state_dict
        raise ModelLoadError(f"Weights of {info.path} do not match its config: {exc}") from exc
