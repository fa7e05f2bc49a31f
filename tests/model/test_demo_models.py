"""The offline demo models: deterministic builds, byte-level tokenizers, chat templates, peaked greedy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from app.models import demo
from app.models.demo import DEMO_BUILD_VERSION, DEMO_MODEL_IDS, build_demo_models, ensure_demo_models
from app.models.loader import inspect_model_dir, load_hf_model, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
UNICODE_SAMPLES = [
    "héllo wörld, ça va? Ελληνικά, русский, 中文 日本語 한국어",
    "emoji 🦙🦅 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👩🏽‍💻 ❤️",
    "  leading spaces\n\ttabs\r\nand 🙂trailing  ",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width, \x00 nul, \ufeff bom, 𓀀 hieroglyph",
]
PROMPTS = [
    "Hello, my name is",
    "The capital of France",
    "def fibonacci(n):",
    "猎隼和兰隼",
    "User: hi\nAssistant:",
    "Once upon a time, in a land far away, there lived",
    "🦙🦅 llamas and falcons",
    "Ελληνικά",
]


@pytest.fixture(scope="module")
def loaded(demo_models_dir: Path) -> dict:
    """model id -> (tokenizer, transformers model), loaded through Lanner's loader."""
    out = {}
    for model_id in DEMO_MODEL_IDS:
        info = inspect_model_dir(demo_models_dir / model_id)
        out[model_id] = (load_tokenizer(info.path), load_hf_model(info))
    return out


def test_layout(demo_models_dir):
    for model_id in DEMO_MODEL_IDS:
        d = demo_models_dir / model_id
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "lanner_demo.json"} <= names
        assert not [n for n in os.listdir(demo_models_dir) if n.startswith(".demo-")]  # no temp leftovers
        assert json.loads((d / "lanner_demo.json").read_text())["build_version"] == DEMO_BUILD_VERSION
        assert (d / "model.safetensors").stat().st_size < 5_000_000


def test_build_is_byte_identical_across_processes(demo_models_dir, tmp_path):
    # Second build in a fresh single-threaded process: same bytes regardless of process and thread count.
    code = "import sys; from pathlib import Path; from app.models.demo import build_demo_models; " \
           "build_demo_models(Path(sys.argv[1]))"
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=REPO_ROOT,
                   timeout=240, capture_output=True)
    for model_id in DEMO_MODEL_IDS:
        a, b = demo_models_dir / model_id, tmp_path / model_id
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for f in a.iterdir():
            assert f.read_bytes() == (b / f.name).read_bytes(), f"{model_id}/{f.name} differs"


def test_configs(loaded, demo_models_dir):
    llama = inspect_model_dir(demo_models_dir / "demo-llama")
    tok = loaded["demo-llama"][0]
    assert llama.arch == "llama" and llama.max_model_len == 1024 and llama.vocab_size == len(tok) == 1024
    assert llama.eos_token_ids == (tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<|eot_id|>"))
    assert llama.bos_token_id == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    c = llama.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert c.intermediate_size == 176 and c.rms_norm_eps == 1e-5 and not c.tie_word_embeddings

    falcon = inspect_model_dir(demo_models_dir / "demo-falcon")
    tok = loaded["demo-falcon"][0]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert falcon.arch == "falcon" and falcon.max_model_len == 1024 and falcon.vocab_size == len(tok)
    assert falcon.eos_token_ids == (eot,) and tok.eos_token_id == eot and falcon.config.eos_token_id == eot
    c = falcon.config
    assert c.multi_query and c.parallel_attn and not c.new_decoder_architecture and not c.alibi and not c.bias
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_kv_heads) == (64, 2, 4, 1)
    assert GenerationConfig.from_pretrained(demo_models_dir / "demo-falcon").eos_token_id == eot


@pytest.mark.parametrize("model_id", DEMO_MODEL_IDS)
def test_unicode_round_trip(loaded, model_id):
    tok = loaded[model_id][0]
    for text in UNICODE_SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert max(ids) < len(tok)
    # Trained on the corpus: common text compresses well below one token per byte.
    sample = "The falcon hunts above the valley, and the llama rests."
    assert len(tok.encode(sample, add_special_tokens=False)) < len(sample.encode()) / 2


def test_llama_bos_and_chat_template(loaded):
    tok = loaded["demo-llama"][0]
    ids = tok.encode("hello there")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode("hello there", add_special_tokens=False) == ids[1:]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦙!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi 🦙!<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    chat_ids = tok.encode(text, add_special_tokens=False)
    assert chat_ids[0] == tok.bos_token_id and chat_ids.count(tok.bos_token_id) == 1
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok.convert_tokens_to_ids(special) in chat_ids  # single special tokens, not split text
    assert chat_ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 2
    plain = tok.decode(chat_ids, skip_special_tokens=True)
    assert plain == "system\n\nBe brief.user\n\nHi 🦙!assistant\n\n"


def test_falcon_no_bos_and_chat_template(loaded):
    tok = loaded["demo-falcon"][0]
    assert tok.bos_token is None
    assert tok.encode("hello there") == tok.encode("hello there", add_special_tokens=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦅!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "Be brief.\nUser: Hi 🦅!\nAssistant: Hello.\nUser: Again\nAssistant:"
    no_system = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert no_system == "User: Hi 🦅!\nAssistant:"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def _greedy(model, tok, prompts: list[str], stop_ids: set[int]) -> list[list[int]]:
    """generate() with left padding; each row cut after its first stop token (later ones are padding)."""
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(stop_ids))
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [next((row[: i + 1] for i, t in enumerate(row) if t in stop_ids), row) for row in rows]


@pytest.mark.parametrize("model_id", DEMO_MODEL_IDS)
def test_greedy_same_alone_and_batched(loaded, model_id):
    tok, model = loaded[model_id]
    stop_ids = set(inspect_model_dir(Path(model.name_or_path)).eos_token_ids)
    alone = [_greedy(model, tok, [p], stop_ids)[0] for p in PROMPTS]
    batched = _greedy(model, tok, PROMPTS, stop_ids)
    assert batched == alone
    # Not degenerate: most continuations use several distinct tokens.
    assert sum(len(set(ids)) >= 4 for ids in alone) >= 6


@pytest.mark.parametrize("model_id", DEMO_MODEL_IDS)
def test_logits_are_peaked(loaded, model_id):
    tok, model = loaded[model_id]
    with torch.inference_mode():
        logits = model(**tok(PROMPTS[5], return_tensors="pt")).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2  # far above float noise
    assert logits.softmax(-1).max(-1).values.mean() < 0.97  # but sampling still has choices


def test_ensure_reuses_existing_build(tmp_path):
    messages: list[str] = []
    first = ensure_demo_models(tmp_path, progress=messages.append)
    assert set(first) == set(DEMO_MODEL_IDS) and messages
    mtimes = {m: (p / "model.safetensors").stat().st_mtime_ns for m, p in first.items()}
    messages.clear()
    second = ensure_demo_models(tmp_path, progress=messages.append)
    assert second == first and messages == []
    assert {m: (p / "model.safetensors").stat().st_mtime_ns for m, p in second.items()} == mtimes


def test_ensure_rebuilds_outdated_or_partial(tmp_path, monkeypatch):
    paths = ensure_demo_models(tmp_path)
    marker = paths["demo-falcon"] / "lanner_demo.json"
    marker.write_text(json.dumps({"build_version": "old"}))
    (paths["demo-llama"] / "lanner_demo.json").unlink()  # e.g. an interrupted copy
    messages: list[str] = []
    ensure_demo_models(tmp_path, progress=messages.append)
    assert sum("building" in m for m in messages) == 2
    assert all(demo.is_current_build(p) for p in paths.values())


def test_ensure_concurrent_callers_build_once(tmp_path):
    messages: list[str] = []
    barrier = threading.Barrier(3)

    def worker() -> None:
        barrier.wait()
        ensure_demo_models(tmp_path, progress=messages.append)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("building" in m for m in messages) == len(DEMO_MODEL_IDS)
    assert all(demo.is_current_build(tmp_path / m) for m in DEMO_MODEL_IDS)


def test_serving_built_demo_models_skips_transformers_model_classes(demo_models_dir):
    """`lanner serve` with no models calls ensure_demo_models in the API process; when the models are already
    built that must not import transformers' model classes (with them its quantizers and torchao, ~95 MiB)."""
    code = ("import sys; from pathlib import Path; from app.models.demo import ensure_demo_models; "
            f"ensure_demo_models(Path({str(demo_models_dir)!r})); "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers.models.', 'torchao'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
