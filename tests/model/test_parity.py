"""Lanner's batched Llama/Falcon runner against transformers' reference on the same weights.

Tiny random models of every supported layout are saved as ordinary safetensors model directories and
loaded through `load_runner`; their logits must match `LlamaForCausalLM` / `FalconForCausalLM` (fp32,
max abs diff <= 1e-4) for a single prefill and for mixed batches (prefills, second prompt chunks at
start_pos > 0, decodes, scattered slots). Greedy tokens of the peaked demo models must equal
`generate()`, alone and in a batch of 8 with chunked, staggered prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

from app.models import ops, stack
from app.models.base import StepInput
from app.models.falcon import FalconDecoder
from app.models.kv_cache import KVCache
from app.models.llama import UnsupportedModelError
from app.models.loader import ModelLoadError, inspect_model_dir, load_hf_model
from app.models.runner import BatchedRunner, load_runner
from tests import reference

ATOL = 1e-4
# bf16 keys and values (kv_cache_dtype: bf16) against transformers' fp32 cache, each K/V element rounded to
# 8 significant bits (relative error <= 2^-9).  Measured on these models (logit std ~5): cosine >= 0.999991,
# max |diff| <= 0.012 of the reference logits' std.
BF16_MIN_COS = 0.99995
BF16_REL_DIFF = 0.02
VOCAB = 512
MAX_LEN = 256


def llama_cfg(**kw) -> LlamaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    base.update(kw)
    return LlamaConfig(**base)


def falcon_cfg(**kw) -> FalconConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, alibi=False,
                layer_norm_epsilon=1e-5, max_position_embeddings=MAX_LEN, bos_token_id=1, eos_token_id=1,
                pad_token_id=1)
    base.update(kw)
    return FalconConfig(**base)


CONFIGS = {
    "llama-gqa-bias": lambda: llama_cfg(attention_bias=True, mlp_bias=True),
    "llama-llama3-rope": lambda: llama_cfg(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32,  # head_dim != hidden / heads
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-tied-linear-rope": lambda: llama_cfg(
        tie_word_embeddings=True, num_key_value_heads=8,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "falcon-7b": lambda: falcon_cfg(multi_query=True, num_kv_heads=1, parallel_attn=True,
                                    new_decoder_architecture=False, bias=False, tie_word_embeddings=False),
    "falcon-40b": lambda: falcon_cfg(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True,
                                     multi_query=True, bias=False, tie_word_embeddings=True),
    "falcon-sequential": lambda: falcon_cfg(multi_query=False, parallel_attn=False,
                                            new_decoder_architecture=False, bias=True,
                                            tie_word_embeddings=False),
}


@torch.no_grad()
def random_init(model, seed: int) -> None:
    """Seeded weights with non-trivial norms and biases; output head scaled up for peaked logits."""
    gen = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings().weight
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)  # norm scales
        elif p is head:
            p.copy_(noise * 0.08 * 8)
        else:
            p.copy_(noise * 0.08)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, demo_models_dir) -> dict[str, Path]:
    """name -> saved model directory (safetensors + config + the demo tokenizer files)."""
    return save_parity_models(tmp_path_factory.mktemp("parity-models"), demo_models_dir)


def save_parity_models(root: Path, demo_models_dir: Path) -> dict[str, Path]:
    """Save every CONFIGS model with seeded random weights under `root`, with the demo tokenizers."""
    out = {}
    for seed, (name, make) in enumerate(CONFIGS.items()):
        config = make()
        cls = LlamaForCausalLM if config.model_type == "llama" else FalconForCausalLM
        model = cls(config).float().eval()
        random_init(model, seed)
        d = root / name
        model.save_pretrained(d, safe_serialization=True)
        tok_src = demo_models_dir / ("demo-llama" if config.model_type == "llama" else "demo-falcon")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_src / f, d / f)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def pairs(model_dirs) -> dict:
    """name -> (transformers model, info) loaded from the saved directory."""
    out = {}
    for name, d in model_dirs.items():
        info = inspect_model_dir(d)
        out[name] = (load_hf_model(info), info)
    return out


def ref_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_ids=torch.tensor([ids])).logits[0, -1].float()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.2e}"


# --------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_prefill(name, pairs):
    hf, info = pairs[name]
    runner = load_runner(info, MAX_LEN, 2)
    ids = random_ids(45, 1)
    logits = runner.step([StepInput(7, ids, 0)])
    assert logits.shape == (1, VOCAB) and logits.dtype == torch.float32
    assert_close(logits[0], ref_last_logits(hf, ids), name)


MIXED_PLAN = [  # per step: seq -> tokens to feed now (prompts of 60, 33, 9, 20 tokens, then sampled ones)
    {0: 25, 1: 33, 2: 8},  # three prefills (seq 0 only its first chunk)
    {2: 1, 0: 30, 3: 20, 1: 1},  # decode, 2nd chunk at start_pos 25, new prefill, decode
    {1: 1, 0: 1, 2: 1, 3: 1},  # decodes only
    {3: 1, 0: 1, 1: 1},
]


def mixed_steps(runner: BatchedRunner):
    """Feed MIXED_PLAN; yields (step, seq ids, logits, each row's whole prefix so far)."""
    seqs = {s: random_ids(n, 10 + s) for s, n in ((0, 60), (1, 33), (2, 9), (3, 20))}
    extra = {s: random_ids(8, 100 + s) for s in seqs}  # "sampled" tokens appended after the prompt
    fed = {s: 0 for s in seqs}
    for step_no, feeds in enumerate(MIXED_PLAN):
        inputs = [StepInput(s, (seqs[s] + extra[s])[fed[s]:fed[s] + n], fed[s]) for s, n in feeds.items()]
        logits = runner.step(inputs)
        for s, n in feeds.items():
            fed[s] += n
        yield step_no, list(feeds), logits, [(seqs[s] + extra[s])[:fed[s]] for s in feeds]


@pytest.mark.parametrize("kv", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["stack", "own-ops", "aten-ops"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_batch(name, mode, kv, pairs, monkeypatch):
    """Prefills, second prompt chunks (start_pos > 0) and decodes in the same steps: all layers in one C++
    call (app/models/stack.py), the Python layers over Lanner's C++ RMSNorm / RoPE + KV store / decode
    attention (app/models/ops.py), and the ATen ops used where the library is not built; with an fp32 and
    a bf16 KV cache."""
    if mode != "aten-ops" and not ops.own_ops():
        pytest.skip("Lanner's kernels library is not built here")
    monkeypatch.setattr(ops, "own_ops", lambda: mode != "aten-ops")
    monkeypatch.setenv(stack.ENABLE_ENV, "1" if mode == "stack" else "0")
    hf, info = pairs[name]
    runner = load_runner(info, MAX_LEN, 4, kv_cache_dtype=kv)
    assert runner.kv.k[0].dtype == (torch.bfloat16 if kv == "bf16" else torch.float32)
    worst = 0.0
    for step_no, seq_ids, logits, prefixes in mixed_steps(runner):
        for row, (s, prefix) in enumerate(zip(seq_ids, prefixes)):
            ref = ref_last_logits(hf, prefix)
            if kv == "fp32":
                assert_close(logits[row], ref, f"{name} step {step_no} seq {s}")
            else:
                what = f"{name} step {step_no} seq {s}"
                worst = max(worst, (logits[row] - ref).abs().max().item() / ref.std().item())
                assert worst <= BF16_REL_DIFF, f"{what}: max |diff| {worst:.3f} of the logits' std"
                assert F.cosine_similarity(logits[row], ref, dim=0) >= BF16_MIN_COS, what
                top = logits[row].argmax()  # the same greedy token, unless the reference has a near-tie
                assert top == ref.argmax() or ref.max() - ref[top] <= 2 * BF16_REL_DIFF * ref.std(), what
    print(f"{name} {mode} kv={kv}: max |diff| / std {worst:.4f}")
    assert (runner.model.stack_cache.get(runner.model, runner.kv) is not None) == (mode == "stack")



@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_stack_equals_python_layers(name, quantize, pairs, monkeypatch):
    """The C++ stack runs the Python layers' ops in the same order, so every logit is bit-identical, for
    fp32 and for Lanner's int8 / int4 layers, through prefills, second chunks and decodes."""
    if not ops.own_ops():
        pytest.skip("Lanner's kernels library is not built here")
    _, info = pairs[name]
    results = {}
    for use_stack in (True, False):
        monkeypatch.setenv(stack.ENABLE_ENV, "1" if use_stack else "0")
        runner = load_runner(info, MAX_LEN, 4, quantize=quantize)
        assert (runner.model.stack_cache.get(runner.model, runner.kv) is not None) == use_stack
        results[use_stack] = [logits for _, _, logits, _ in mixed_steps(runner)]
    for step_no, (a, b) in enumerate(zip(results[True], results[False])):
        assert torch.equal(a, b), f"{name} {quantize} step {step_no}: max diff {(a - b).abs().max().item()}"


@pytest.mark.parametrize("name", ["llama-gqa-bias", "falcon-40b"])
def test_decode_with_scattered_slots(name, pairs):
    """Decode rows whose slots leave holes: the packed-range (scatter) and gather attention paths."""
    hf, info = pairs[name]
    runner = load_runner(info, MAX_LEN, 8)
    prompts = {s: random_ids(5 + 3 * s, 200 + s) for s in range(8)}
    runner.step([StepInput(s, p, 0) for s, p in prompts.items()])
    assert runner.num_free_slots == 0 and runner.kv_usage == 1.0
    for s in (1, 2, 5, 6):
        runner.free(s)
    live = {0: [], 3: [], 4: [], 7: []}
    for keep in ([0, 3, 4], [0, 7], [3, 4, 7]):  # slot ranges 5 <= 2*3 (scatter), 8 > 2*2 (gather), 5 <= 6
        inputs = [StepInput(s, [11 + s], len(prompts[s]) + len(live[s])) for s in keep]
        logits = runner.step(inputs)
        for row, s in enumerate(keep):
            live[s].append(11 + s)
            assert_close(logits[row], ref_last_logits(hf, prompts[s] + live[s]), f"{name} seq {s}")


def test_free_then_reuse_slot_has_no_stale_kv(pairs):
    hf, info = pairs["llama-gqa-bias"]
    runner = load_runner(info, MAX_LEN, 1)
    long = random_ids(80, 300)
    runner.step([StepInput(0, long, 0)])
    for i in range(3):
        runner.step([StepInput(0, [5 + i], 80 + i)])
    runner.free(0)
    assert runner.num_free_slots == 1 and runner.kv_usage == 0.0
    short = random_ids(12, 301)  # the reused slot still holds 83 positions of the old sequence
    assert_close(runner.step([StepInput(1, short, 0)])[0], ref_last_logits(hf, short), "reused prefill")
    for i in range(3):
        short = short + [40 + i]
        logits = runner.step([StepInput(1, [40 + i], len(short) - 1)])
        assert_close(logits[0], ref_last_logits(hf, short), "reused decode")


# --------------------------------------------------------------------------- greedy vs generate()


def drive_greedy(runner: BatchedRunner, prompts: list[list[int]], max_new: int, eos: set[int],
                 chunk: int = 10**9, join_every: int = 0) -> list[list[int]]:
    """Greedy decoding through `runner.step`, engine-style: prompt chunks of <= `chunk` tokens, sequence i
    joins at step i * join_every, finished sequences are freed."""
    fed = [0] * len(prompts)
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    step_no = 0
    while not all(done):
        inputs, owners = [], []
        for i, p in enumerate(prompts):
            if done[i] or step_no < i * join_every:
                continue
            full = p + outs[i]
            n = min(chunk, len(full) - fed[i]) if fed[i] < len(p) else 1
            inputs.append(StepInput(i, full[fed[i]:fed[i] + n], fed[i]))
            owners.append(i)
        if inputs:
            logits = runner.step(inputs)
            for row, i in enumerate(owners):
                fed[i] += len(inputs[row].token_ids)
                if fed[i] < len(prompts[i]):
                    continue  # mid-prompt chunk: the engine ignores this row
                token = int(logits[row].argmax())
                outs[i].append(token)
                if token in eos or len(outs[i]) >= max_new:
                    done[i] = True
                    runner.free(i)
        step_no += 1
    return outs


DEMO_PROMPTS = [
    "Hello, my name is",
    "The capital of France",
    "def fibonacci(n):",
    "User: hi\nAssistant:",
    "Once upon a time, in a land far away, there lived",
    "llamas and falcons",
    "A",
    "The quick brown fox jumps over the lazy dog, and then the dog",
]


@pytest.mark.parametrize("model_id", ["demo-llama", "demo-falcon"])
def test_greedy_matches_generate(model_id, demo_models_dir):
    d = demo_models_dir / model_id
    info = inspect_model_dir(d)
    eos = set(info.eos_token_ids)
    prompts = [reference.encode(d, text) for text in DEMO_PROMPTS]
    expected = [reference.greedy_ids(d, p, 20) for p in prompts]
    assert any(len(e) == 20 for e in expected)
    single = load_runner(info, 512, 1)
    assert drive_greedy(single, [prompts[0]], 20, eos) == [expected[0]]
    # chunked prompt, in the slot the first sequence freed
    assert drive_greedy(single, [prompts[4]], 20, eos, chunk=4) == [expected[4]]
    batch = load_runner(info, 512, 8)
    assert drive_greedy(batch, prompts, 20, eos) == expected
    assert batch.num_free_slots == 8
    assert drive_greedy(batch, prompts, 20, eos, chunk=5, join_every=2) == expected  # staggered + chunked


# --------------------------------------------------------------------------- sizing, errors


def test_slot_count_from_kv_budget(pairs):
    _, info = pairs["llama-gqa-bias"]
    per_slot = KVCache.bytes_per_slot(num_layers=2, num_kv_heads=2, head_dim=8, max_len=MAX_LEN)
    assert per_slot == 2 * 2 * 2 * MAX_LEN * 8 * 4
    # a bf16 cache (the default of a quantized model) fits twice the slots in the same budget
    bf16 = load_runner(info, MAX_LEN, 16, kv_cache_bytes=int(3.5 * per_slot), kv_cache_dtype="bf16")
    assert bf16.max_num_seqs == 7 and bf16.kv.nbytes == 7 * per_slot // 2
    assert load_runner(info, MAX_LEN, 16, kv_cache_bytes=int(3.5 * per_slot), quantize="int8").max_num_seqs == 7
    runner = load_runner(info, MAX_LEN, 16, kv_cache_bytes=int(3.5 * per_slot))
    assert runner.max_num_seqs == 3 and runner.num_free_slots == 3
    assert runner.kv.nbytes == 3 * per_slot
    assert load_runner(info, MAX_LEN, 2, kv_cache_bytes=10 * per_slot).max_num_seqs == 2  # capped
    assert load_runner(info, MAX_LEN, 5).max_num_seqs == 5  # no budget: max_num_seqs slots
    with pytest.raises(ModelLoadError, match="too small"):
        load_runner(info, MAX_LEN, 4, kv_cache_bytes=per_slot - 1)
    runner.step([StepInput(0, [3, 4, 5], 0), StepInput(1, [6], 0)])
    assert runner.num_free_slots == 1 and runner.kv_usage == pytest.approx(2 / 3)
    assert runner.num_cached_tokens == 4
    runner.step([StepInput(2, [7], 0)])
    with pytest.raises(RuntimeError, match="no free KV cache slot"):
        runner.step([StepInput(3, [8], 0)])
    assert runner.num_free_slots == 0


def test_step_errors(pairs):
    _, info = pairs["llama-gqa-bias"]
    runner = load_runner(info, 32, 2)
    runner.step([StepInput(0, [3, 4, 5], 0)])
    with pytest.raises(RuntimeError, match="out of step"):
        runner.step([StepInput(0, [6], 2)])
    with pytest.raises(RuntimeError, match="out of step"):
        runner.step([StepInput(1, [6], 4)])
    with pytest.raises(ValueError, match="max_model_len"):
        runner.step([StepInput(0, list(range(30)), 3)])
    assert runner.num_free_slots == 1  # the failed new sequence got no slot


def test_alibi_is_refused(demo_models_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        FalconDecoder(falcon_cfg(alibi=True))
    d = tmp_path / "falcon-alibi"
    shutil.copytree(demo_models_dir / "demo-falcon", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["alibi"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="ALiBi"):
        load_runner(inspect_model_dir(d), 64, 1)
