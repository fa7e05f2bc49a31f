"""The worker process's build path (`app.engine.process._build_core`) as the server runs it: the API process
hands over `ModelInfo.for_worker()` and the tokenizer's Rust backend, and the worker serves the same tokens
and text as one that reads the model directory itself, without importing transformers. The API process's
own tokenizer is the class `AutoTokenizer` picks, loaded directly (without torch)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from app.engine.process import WorkerConfig
from app.models.loader import (
    ModelLoadError,
    backend_tokenizer_json,
    describe_model_dirs,
    inspect_model_dir,
    load_tokenizer,
    worker_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, pickle, sys
from app.engine.process import _build_core
from app.engine.types import SamplingParams
from app.engine.worker import NewRequest

cfg = pickle.loads(sys.stdin.buffer.read())
out = []
core = _build_core(cfg, emit=lambda batch, stats: out.extend(batch))
for i, (prompt, stop) in enumerate(json.loads(sys.argv[1])):
    core.inbox.put(NewRequest(f"r{i}", prompt, SamplingParams(max_tokens=24, temperature=0.0, stop=stop)))
core._drain_inbox(block=False)
while core.scheduler.has_work:
    core.step()
texts, ids, reasons = {}, {}, {}
for rid, delta in out:
    texts[rid] = texts.get(rid, "") + delta.text
    ids[rid] = ids.get(rid, []) + delta.token_ids
    if delta.finish_reason is not None:
        reasons[rid] = delta.finish_reason.value
print(json.dumps({"texts": texts, "ids": ids, "reasons": reasons,
                  "transformers": "transformers" in sys.modules, "tokenizer": type(core.tokenizer).__module__}))
"""


def run_worker_build(cfg: WorkerConfig, requests: list) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(requests)], input=pickle.dumps(cfg),
                          capture_output=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["demo-llama", "demo-falcon"])
def test_worker_from_the_api_process_handover_imports_no_transformers(demo_models_dir, name):
    path = demo_models_dir / name
    info, tokenizer = inspect_model_dir(path), load_tokenizer(path)
    prompts = ["Once upon a time", "Ünïcödé ✓ 日本語", "def main():"]
    # a stop string from the text the model goes on to write, so that stop handling is exercised too
    requests = [[tokenizer.encode(p), []] for p in prompts]
    cfg = WorkerConfig(model_id=name, model_path=str(path), max_model_len=128, max_num_seqs=4,
                       max_num_batched_tokens=64, cpus=None, num_threads=1, runner="batched",
                       kv_cache_bytes=None, quantize="int8")
    own = run_worker_build(cfg, requests)
    stop = own["texts"]["r0"][5:8]
    requests[0][1] = [stop]
    own = run_worker_build(cfg, requests)
    handed = run_worker_build(WorkerConfig(**{**vars(cfg), "info": info.for_worker(),
                                              "tokenizer_json": backend_tokenizer_json(tokenizer)}), requests)
    assert own["transformers"] and not handed["transformers"]
    assert own["tokenizer"].startswith("transformers.") and handed["tokenizer"] == "tokenizers"
    served = ("texts", "ids", "reasons")
    assert {k: handed[k] for k in served} == {k: own[k] for k in served}
    assert handed["reasons"]["r0"] == "stop" and stop not in handed["texts"]["r0"]
    assert all(len(handed["ids"][f"r{i}"]) == 24 for i in (1, 2)) and handed["texts"]["r1"]


@pytest.mark.parametrize("name", ["demo-llama", "demo-falcon"])
def test_backend_tokenizer_decodes_like_the_transformers_tokenizer(demo_models_dir, name):
    """Every token alone and a mixed sequence, with and without special tokens: the worker's backend-only
    tokenizer gives the transformers tokenizer's text (without its clean-up pass, which the detokenizer
    never applies)."""
    tokenizer = load_tokenizer(demo_models_dir / name)
    backend = worker_tokenizer(demo_models_dir / name, backend_tokenizer_json(tokenizer))
    ids = list(range(len(tokenizer)))
    for skip in (True, False):
        assert [backend.decode([i], skip_special_tokens=skip) for i in ids] == \
            [tokenizer.decode([i], skip_special_tokens=skip, clean_up_tokenization_spaces=False) for i in ids]
        mixed = tokenizer.encode("Hello ✓ there") + tokenizer.all_special_ids + tokenizer.encode(" 日本")
        assert backend.decode(mixed, skip_special_tokens=skip) == \
            tokenizer.decode(mixed, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", ["demo-llama", "demo-falcon"])
def test_the_tokenizer_class_describe_names_loads_like_autotokenizer(demo_models_dir, name):
    """`describe_model_dirs` names the class AutoTokenizer chose; the API process loads that class directly
    (AutoTokenizer imports torch) and must tokenize, render chats and decode exactly as AutoTokenizer's."""
    path = demo_models_dir / name
    (info,) = describe_model_dirs([path])
    auto, direct = load_tokenizer(path), load_tokenizer(path, info.tokenizer_class)
    assert type(direct) is type(auto) and info.tokenizer_class.startswith("transformers.")
    own = inspect_model_dir(path)
    assert (info.arch, info.max_model_len, info.vocab_size, info.eos_token_ids, info.bos_token_id) == \
        (own.arch, own.max_model_len, own.vocab_size, own.eos_token_ids, own.bos_token_id)
    specials = " ".join(auto.all_special_tokens)
    for text in ["Hello ✓ there", f" 日本 {specials} x", ""]:
        for add in (True, False):
            assert direct.encode(text, add_special_tokens=add) == auto.encode(text, add_special_tokens=add)
        assert direct.encode(text, add_special_tokens=False, split_special_tokens=True) == \
            auto.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert (direct.all_special_ids, direct.all_special_tokens) == (auto.all_special_ids, auto.all_special_tokens)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
    for gen in (True, False):
        assert direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
            auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    ids = list(range(len(auto)))
    assert [direct.decode([i]) for i in ids] == [auto.decode([i]) for i in ids]
    assert direct.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)


def test_load_tokenizer_loads_only_transformers_classes(demo_models_dir):
    with pytest.raises(ModelLoadError, match="not a transformers tokenizer class"):
        load_tokenizer(demo_models_dir / "demo-llama", "os.system")

