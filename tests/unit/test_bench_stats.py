"""Load-generator statistics, report tables and the streamed safetensors writer of bench/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from loadstats import RequestRecord, percentile, summarize_level  # noqa: E402
from report import comparison_markdown, level_table  # noqa: E402


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile(list(range(101)), 90) == pytest.approx(90.0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _record(start: float, chunks: list[float], end: float, tokens: int, error: str | None = None) -> RequestRecord:
    return RequestRecord(start=start, end=end, chunk_times=chunks, prompt_tokens=30, output_tokens=tokens,
                         error=error)


def test_summary_counts_tokens_from_usage_not_chunks() -> None:
    records = [
        _record(0.0, [0.1, 0.2, 0.3], 0.3, tokens=5),  # 3 chunks for 5 tokens
        _record(0.0, [0.2, 0.4], 0.4, tokens=3),
        _record(0.0, [], 0.05, tokens=0, error="APIError: boom"),
    ]
    s = summarize_level(2, records, wall_s=0.5, health_latencies=[0.001, 0.003], health_errors=1)
    assert s.num_requests == 3 and s.num_errors == 1
    assert s.output_tokens == 8
    assert s.output_tokens_per_s == pytest.approx(16.0)
    assert s.requests_per_s == pytest.approx(4.0)
    assert s.chunks_per_token == pytest.approx(5 / 8)
    assert s.ttft_s["p50"] == pytest.approx(0.15)
    assert sorted(g for r in records for g in r.itls()) == pytest.approx([0.1, 0.1, 0.2])
    assert records[0].tpot() == pytest.approx((0.3 - 0.1) / 4)
    assert s.health_s["p50"] == pytest.approx(0.002) and s.health_errors == 1
    assert s.errors == ["APIError: boom"]


def test_tables_render_with_missing_levels() -> None:
    def result(name: str, levels: list[int], tok_s: float) -> dict:
        lv = [summarize_level(c, [_record(0.0, [0.1, 0.2], 0.2, tokens=2)], wall_s=2 / (tok_s * c)).to_dict()
              for c in levels]
        for d, c in zip(lv, levels):
            d["output_tokens_per_s"] = tok_s * c
        return {"name": name, "settings": {}, "machine": {}, "levels": lv}

    lanner, base = result("lanner", [1, 2, 16], 10.0), result("baseline", [1, 16], 5.0)
    table = level_table(lanner, base)
    assert "| 16 | 1 | 0 | 160.0 |" in table and "| 2.00 |" in table  # 160 / 80 tok/s at 16 streams
    md = comparison_markdown(lanner, base)
    assert "**16.00×**" in md and "**2.00×**" in md  # lanner 16 vs 1 stream; lanner vs baseline at 16


def test_streamed_safetensors_loads_in_transformers(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import make_models as mm

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    shapes = mm.parameter_shapes(config)
    head_rows = [1, 5, 7]
    mm.write_safetensors(tmp_path / "model.safetensors", shapes, mm.generate_weights(config, 3, head_rows))
    config.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    head = tensors[mm.HEAD_NAME]
    assert head.abs().sum(dim=1).nonzero().flatten().tolist() == head_rows
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    again = dict(mm.generate_weights(config, 3, head_rows))  # deterministic
    assert all(torch.equal(again[k], tensors[k]) for k in shapes)


def test_streamed_safetensors_in_bf16(tmp_path: Path) -> None:
    """`falcon-7b` is stored in bf16: the same draws, rounded once, and the GGUF converter is told so."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    import gguf_convert
    import make_models as mm

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    shapes = mm.parameter_shapes(config)
    mm.write_safetensors(tmp_path / "model.safetensors", shapes, mm.generate_weights(config, 3, [1, 5]),
                         dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    fp32 = dict(mm.generate_weights(config, 3, [1, 5]))
    assert all(tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], fp32[k].bfloat16())
               for k in shapes)
    assert (tmp_path / "model.safetensors").stat().st_size - 8 < 2 * mm.num_bytes(shapes, torch.bfloat16)
    assert gguf_convert.source_outtype(tmp_path) == "bf16"
    mm.write_safetensors(tmp_path / "model.safetensors", shapes, mm.generate_weights(config, 3, [1, 5]))
    assert gguf_convert.source_outtype(tmp_path) == "f32"
    full = mm.recipe_for("falcon-7b", 8)
    assert full.marker()["dtype"] == "BF16" and full.num_layers == 32
    assert "dtype" not in mm.recipe_for("tinyllama-1.1b", 8).marker()  # fp32 builds keep their markers


def test_llama_server_baseline_matches_lanners_quantization_and_slots() -> None:
    """run_load --baseline llama-server: the GGUF follows Lanner's --quantize (however it was passed), and
    llama-server gets one slot per client with the context split between them."""
    from llama_server import GGUF_FOR_QUANTIZE, server_command
    from run_load import lanner_quantize

    assert lanner_quantize(["--quantize=int4"]) == "int4"
    assert lanner_quantize(["--kv-cache-dtype", "bf16", "--quantize", "int8"]) == "int8"
    assert lanner_quantize(["--quantize"]) == lanner_quantize([]) == "none"
    assert GGUF_FOR_QUANTIZE["int8"] == "q8_0" and GGUF_FOR_QUANTIZE["int4"] == "q4_0"
    cmd = server_command(Path("/bin/llama-server"), Path("m.gguf"), "tiny", 8001, slots=32, slot_tokens=256,
                         threads=2)
    args = dict(zip(cmd[1::2], cmd[2::2]))
    assert args["-np"] == "32" and args["-c"] == str(32 * 256) and args["-a"] == "tiny" and args["-t"] == "2"
    assert args["-m"] == "m.gguf" and args["--port"] == "8001" and cmd[-1] == "--no-webui"
