"""The manifest of a pre-quantized checkpoint (lanner_quant.json): the format constants and the check
that a directory holds this code's format.  No torch here: the torch-free worker (app/lite) reads it too.
app/quant/checkpoint.py describes the format and writes and loads checkpoints with torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

from app.models.loader import ModelLoadError

MANIFEST_FILE = "lanner_quant.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "lanner-woq"
FORMAT_VERSION = 4  # 4: int4 scales on 8-bit row code grids; 3: int8 token embedding (was fp32/bf16);
# 2: integer int4 zero points (were bf16)
# What a loader must know to read the tensors.  Any change to the layout (names, dtypes, nibble order, the
# meaning of scales/zeros, the decoders' fused state-dict layout) changes FORMAT_HASH; bump FORMAT_VERSION
# with it (tests/unit/test_woq_checkpoint.py pins the pair).
FORMAT_SPEC = MappingProxyType({
    "container": "one model.safetensors; Lanner decoder state-dict names",
    "decoder": "llama: layers.i.qkv_proj = cat(q, k, v), layers.i.gate_up_proj = cat(gate, up); "
               "falcon: layers.i.qkv_proj rows in [q heads | k heads | v heads] order",
    "int8": "<m>.qweight int8 [N, K]; <m>.scales bf16 [N]; w = q * scales[n]",
    "int4": "<m>.qweight uint8 [N, K/2], byte j = q[:, 2j] | q[:, 2j+1] << 4, q in 0..15; "
            "<m>.scales bf16 [N, K/G], scales[n, g] = c * 2^e[n] with c an integer 1..255; "
            "<m>.zeros uint8 [N, K/G], 0..15; "
            "w = (q - zeros[n, k // G]) * scales[n, k // G]",
    "bias": "<m>.bias fp32 [N]",
    "embedding": "manifest embedding=int8: embed_tokens.qweight int8 [V, H], embed_tokens.scales bf16 [V], "
                 "row v = q[v] * scales[v]; embedding=lm_head (tied, int8 head): no tensor, lm_head's rows",
    "other": "state-dict name, fp32 or a lossless bf16/fp16",
})
FORMAT_HASH = hashlib.sha256(json.dumps(dict(FORMAT_SPEC), sort_keys=True).encode()).hexdigest()[:16]

def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a pre-quantized directory, checked against this code's format (ModelLoadError)."""
    file = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read {file}: {exc}") from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        raise ModelLoadError(f"{file} is not a Lanner quantized-checkpoint manifest "
                             f"(format {FORMAT_NAME!r}).")
    if fmt.get("version") != FORMAT_VERSION or fmt.get("hash") != FORMAT_HASH:
        made_by = manifest.get("lanner_version", "unknown")
        raise ModelLoadError(
            f"Model in {path} was quantized by Lanner {made_by} in checkpoint format version "
            f"{fmt.get('version')} (hash {fmt.get('hash')}); this Lanner reads format version "
            f"{FORMAT_VERSION} (hash {FORMAT_HASH}) only. Quantize the original model again with "
            "`lanner quantize`.")
    modules = manifest.get("modules")
    if (manifest.get("mode") not in ("int8", "int4") or not isinstance(modules, dict)
            or not all(isinstance(entry, dict) for entry in modules.values())):
        raise ModelLoadError(f"{file} has no valid `mode` (int8|int4) or `modules`.")
    return manifest
