"""Pre-quantized checkpoint pieces without a model: the portable int4 layout, the streaming safetensors
writer, lossless compaction, the pinned format version."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from app.quant.checkpoint import FORMAT_HASH, FORMAT_VERSION, SafetensorsWriter, _compact
from app.quant.woq import (
    NEVER,
    Int4Linear,
    dequantize_int4,
    pack_nibbles,
    probe_int4_layout,
    quantize_int4,
    quantize_weight,
    unpack_nibbles,
)

# FORMAT_HASH of each FORMAT_VERSION. Changing FORMAT_SPEC changes the hash: bump FORMAT_VERSION and add a
# line here, since checkpoints written before the change can no longer be read as they were.
PINNED_FORMATS = {1: "24ae9ab4794a4c1a", 2: "8fd912766b386699", 3: "ae33b76951496645", 4: "a1fd90913d10a372"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_format_version_pins_its_hash():
    assert PINNED_FORMATS.get(FORMAT_VERSION) == FORMAT_HASH


def test_nibble_layout_is_plain_and_round_trips():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]])
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]  # low nibble first
    q = torch.randint(0, 16, (37, 96), generator=gen(0))
    assert torch.equal(unpack_nibbles(pack_nibbles(q)).long(), q)


def test_portable_int4_is_independent_of_the_kernel_layout():
    """The stored bytes are pack_nibbles of the quantizer's q (no ATen packing), and the module built from
    them computes with the dequantized portable weight (rows not a multiple of the kernel's 64) up to ATen's
    bf16 float zero (8 - z) * s."""
    w = torch.randn(100, 128, generator=gen(1))
    qw = quantize_weight(w, "int4", 32)
    q, s, z = quantize_int4(w, 32)
    assert torch.equal(qw.qweight, pack_nibbles(q)) and torch.equal(qw.scales, s) and torch.equal(qw.zeros, z)
    mod = Int4Linear.from_quantized(qw, 0, probe_int4_layout())  # dequant path: fp32
    assert (mod.dequantize() - dequantize_int4(q, s, z, 32)).abs().max() <= 8 * s.max() * 2 ** -9
    x = torch.randn(3, 128, generator=gen(2))
    ref = x @ qw.dequantize().t()
    assert ((mod(x) - ref).norm() / ref.norm()) < 2e-3  # the bf16 float zeros
    packed_mod = Int4Linear.from_quantized(qw, NEVER, None)
    assert ((packed_mod(x) - mod(x)).norm() / mod(x).norm()) < 1e-2  # bf16 activations


def test_writer_round_trips_mixed_dtypes_with_alignment(tmp_path):
    tensors = {
        "a.f32": torch.randn(3, 5, generator=gen(3)),
        "b.bf16": torch.randn(7, generator=gen(4)).to(torch.bfloat16),  # odd byte counts before wider types
        "c.u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "d.i8": torch.randint(-128, 127, (3, 3), dtype=torch.int8),
        "e.f16": torch.randn(1, generator=gen(5)).half(),
        "f.i32": torch.arange(5, dtype=torch.int32),
        "g.empty": torch.zeros(0, 4),
        "h.scalar": torch.tensor(2.5),
        "i.strided": torch.randn(4, 6, generator=gen(6)).t(),  # non-contiguous input
    }
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, metadata={"format": "pt", "k": "v"})
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    assert not list(tmp_path.glob("tmp*"))  # spools are gone
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    itemsize = {"F32": 4, "I32": 4, "BF16": 2, "F16": 2, "U8": 1, "I8": 1}
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % itemsize[entry["dtype"]] == 0, name
    again = SafetensorsWriter(tmp_path / "y.safetensors")
    again.add("a", torch.zeros(1))
    with pytest.raises(ValueError, match="twice"):
        again.add("a", torch.zeros(1))
    again.abort()


def test_compact_is_lossless():
    exact = torch.randn(1000, generator=gen(7)).to(torch.bfloat16).float()
    assert _compact(exact).dtype == torch.bfloat16 and torch.equal(_compact(exact).float(), exact)
    half = torch.tensor([1.0, 0.5, 2.0 ** -20])  # 2^-20: an fp16 subnormal, exact; bf16 too
    assert torch.equal(_compact(half).float(), half)
    fine = torch.randn(1000, generator=gen(8))
    assert _compact(fine) is fine
    norms = torch.ones(64)
    assert _compact(norms).dtype == torch.bfloat16
