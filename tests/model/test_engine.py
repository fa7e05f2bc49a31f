"""The engine loop on the real demo models: interleaved requests give the same tokens as alone and as
transformers' generate(); aborts and failing steps free the sequence and leave the engine serving."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from app.engine.client import EngineClient, EngineDeadError
from app.engine.types import FinishReason, SamplingParams
from app.engine.worker import EngineCore, ThreadEngine
from app.models.loader import inspect_model_dir, load_hf_model, load_tokenizer
from app.models.reference import ReferenceRunner
from tests import reference as ref

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(params=["demo-llama", "demo-falcon"])
def model_dir(request, demo_models_dir):
    return demo_models_dir / request.param


class _Engine:
    def __init__(self, model_dir, runner_cls=ReferenceRunner, max_num_seqs=8, max_batched=512):
        info = inspect_model_dir(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.runner = runner_cls(load_hf_model(info), info.max_model_len, max_num_seqs)
        self.core = EngineCore(self.runner, self.tokenizer, info.eos_token_ids, emit_batch=lambda *_: None,
                               max_num_batched_tokens=max_batched)
        self.thread = ThreadEngine(self.core)
        self.client = EngineClient(self.thread, asyncio.get_running_loop())
        self.thread.start()

    async def run(self, rid: str, prompt: list[int], params: SamplingParams = GREEDY):
        text, ids, reason = "", [], None
        async for d in self.client.add_request(rid, prompt, params):
            text += d.text
            ids += d.token_ids
            reason = d.finish_reason
        return text, ids, reason

    def close(self):
        self.thread.shutdown(10)


@pytest.fixture
async def engine(model_dir):
    e = _Engine(model_dir)
    yield e
    e.close()


PROMPTS = ["Hello there", "The weather in Paris", "def main():", "日本語のテキスト", "1 2 3 4",
           "Once upon a time", "Ünïcödé ✓", "A"]


async def test_interleaved_batch_equals_alone_equals_reference(engine, model_dir):
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    alone = [await engine.run(f"a{i}", p) for i, p in enumerate(prompts)]
    together = await asyncio.gather(*[engine.run(f"b{i}", p) for i, p in enumerate(prompts)])
    assert together == alone
    for p, (text, ids, reason) in zip(prompts, alone):
        want_text, want_ids = ref.greedy_text(model_dir, p, GREEDY.max_tokens)
        assert ids == want_ids
        assert text == want_text
        assert reason is (FinishReason.LENGTH if len(ids) == GREEDY.max_tokens else FinishReason.STOP)


async def test_seeded_sampling_is_reproducible_in_any_company(engine):
    p = engine.tokenizer.encode("Sampling test")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    alone = await engine.run("s0", p, params)
    crowd = await asyncio.gather(engine.run("s1", p, params),
                                 *[engine.run(f"o{i}", p, dataclasses.replace(params, seed=i)) for i in range(4)])
    assert crowd[0] == alone


async def test_abort_frees_the_sequence(engine):
    p = engine.tokenizer.encode("abort me")
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    it = engine.client.add_request("x", p, params)
    first = await it.__anext__()
    # (a busy event loop may get the first steps' deltas merged into one: at least one token, not all)
    assert 1 <= first.num_output_tokens < params.max_tokens and first.finish_reason is None
    await it.aclose()  # the client went away
    # the engine applies the abort at its next step; a later request is then served alone
    out = await engine.run("after", p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[1]) == 3
    assert engine.core.num_unfinished == 0
    assert engine.runner._caches == {}


class _FlakyRunner(ReferenceRunner):
    """Fails any step that contains a sequence whose prompt starts with token 13."""

    def step(self, inputs):
        if any(i.start_pos == 0 and i.token_ids[:1] == [13] for i in inputs):
            raise RuntimeError("boom")
        return super().step(inputs)


async def test_failing_step_fails_its_requests_not_the_engine(demo_models_dir):
    e = _Engine(demo_models_dir / "demo-llama", runner_cls=_FlakyRunner)
    try:
        with pytest.raises(EngineDeadError):
            await e.run("bad", [13, 14, 15])
        text, ids, _ = await e.run("good", e.tokenizer.encode("fine"))
        assert len(ids) == GREEDY.max_tokens or ids[-1] in inspect_model_dir(demo_models_dir / "demo-llama").eos_token_ids
        assert e.core.num_unfinished == 0 and e.runner._caches == {}
    finally:
        e.close()


async def test_shutdown_finishes_open_requests_with_abort(demo_models_dir):
    e = _Engine(demo_models_dir / "demo-falcon")
    it = e.client.add_request("long", e.tokenizer.encode("x"), SamplingParams(max_tokens=1000, ignore_eos=True))
    await it.__anext__()
    await asyncio.to_thread(e.close)
    reasons = [d.finish_reason async for d in it]
    assert reasons[-1] is FinishReason.ABORT
