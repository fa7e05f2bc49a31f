"""Log-probabilities from the engine (sampled tokens and, for echo, prompt tokens) equal log_softmax of
transformers' logits on the same weights, whatever the runner, the prefill chunking or the batch around."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.engine.client import EngineClient
from app.engine.types import SamplingParams
from app.engine.worker import EngineCore, ThreadEngine
from app.models.loader import inspect_model_dir, load_hf_model, load_tokenizer
from app.models.reference import ReferenceRunner
from app.models.runner import load_runner
from tests import reference as ref

TOP = 3
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, logprobs=TOP, prompt_logprobs=TOP, ignore_eos=True)


@pytest.fixture(params=[("demo-llama", "batched"), ("demo-falcon", "batched"), ("demo-llama", "reference")],
                ids=lambda p: "-".join(p))
async def setup(request, demo_models_dir):
    name, runner_kind = request.param
    model_dir = demo_models_dir / name
    info = inspect_model_dir(model_dir)
    runner = (load_runner(info, 256, 8) if runner_kind == "batched"
              else ReferenceRunner(load_hf_model(info), 256, 8))
    # a 5-token step budget: prompts are prefilled in several chunks, beside other sequences' decodes
    core = EngineCore(runner, load_tokenizer(model_dir), info.eos_token_ids, emit_batch=lambda *_: None,
                      max_num_batched_tokens=5)
    thread = ThreadEngine(core)
    client = EngineClient(thread, asyncio.get_running_loop())
    thread.start()
    yield model_dir, client
    thread.shutdown(10)


async def run(client: EngineClient, rid: str, prompt: list[int], params: SamplingParams):
    ids, logprobs, prompt_logprobs = [], [], None
    async for d in client.add_request(rid, prompt, params):
        ids += d.token_ids
        logprobs += d.logprobs or []
        if d.prompt_logprobs is not None:
            assert prompt_logprobs is None, "prompt logprobs are delivered once"
            prompt_logprobs = d.prompt_logprobs
    return ids, logprobs, prompt_logprobs


def assert_matches(entry, token: int, row: torch.Tensor) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
    want = torch.topk(row, TOP)
    assert [t for t, _ in entry.top] == want.indices.tolist()
    assert [v for _, v in entry.top] == pytest.approx(want.values.tolist(), abs=1e-4)


async def test_logprobs_match_transformers(setup):
    model_dir, client = setup
    prompts = [ref.encode(model_dir, t) for t in ("The weather in Paris is", "Once upon a time there", "A")]
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = await asyncio.gather(*[run(client, f"r{i}", p, PARAMS) for i, p in enumerate(prompts)],
                                   *[run(client, f"o{i}", p, plain) for i, p in enumerate(prompts)])
    for prompt, (ids, logprobs, prompt_lps) in zip(prompts, results):
        rows = ref.log_softmax_rows(model_dir, prompt + ids)
        assert len(logprobs) == len(ids) == PARAMS.max_tokens
        for k, (token, entry) in enumerate(zip(ids, logprobs)):
            assert_matches(entry, token, rows[len(prompt) - 1 + k])
            assert entry.top[0][0] == token  # greedy: the chosen token is the most likely one
        assert len(prompt_lps) == len(prompt) - 1
        for t, entry in enumerate(prompt_lps, start=1):
            assert_matches(entry, prompt[t], rows[t - 1])
    for ids, logprobs, prompt_lps in results[len(prompts):]:  # neighbours that asked for none get none
        assert logprobs == [] and prompt_lps is None


async def test_sampled_tokens_get_their_raw_logprob(setup):
    """With temperature and penalties the token is drawn from a changed distribution, but the reported
    logprob is the model's own (raw logits), like vLLM and OpenAI."""
    model_dir, client = setup
    prompt = ref.encode(model_dir, "Sampling with logprobs")
    params = SamplingParams(max_tokens=5, temperature=1.5, top_k=20, seed=3, presence_penalty=1.0, logprobs=0,
                            ignore_eos=True)
    ids, logprobs, prompt_lps = await run(client, "s", prompt, params)
    rows = ref.log_softmax_rows(model_dir, prompt + ids)
    assert prompt_lps is None
    for k, (token, entry) in enumerate(zip(ids, logprobs)):
        assert entry.top == ()
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(rows[len(prompt) - 1 + k][token].item(), abs=1e-4)


@pytest.mark.parametrize("name", ["demo-llama", "demo-falcon"])
def test_token_bytes_are_the_real_bytes(demo_models_dir, name):
    """A token holding part of a UTF-8 character decodes to U+FFFD alone; its bytes are still the real ones."""
    from app.api.logprobs import token_strings

    tok = load_tokenizer(demo_models_dir / name)
    strings = token_strings(tok)
    text = "Ünïcödé ✓ 日本語のテキスト 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in strings.text(t) for t in ids), "the sample should split some character"
    assert b"".join(bytes(strings.bytes(t)) for t in ids).decode("utf-8") == text
    assert token_strings(tok) is strings  # cached per tokenizer
