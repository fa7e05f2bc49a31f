"""Prefix caching: a new sequence continues from the longest prefix of its prompt that a free KV slot still
holds (BatchedRunner.adopt), and gets the logits and tokens a full prefill would give."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.engine.client import EngineClient
from app.engine.types import SamplingParams
from app.engine.worker import EngineCore, ThreadEngine
from app.models.base import StepInput
from app.models.loader import inspect_model_dir, load_tokenizer
from app.models.runner import load_runner
from tests import reference as ref


@pytest.fixture(params=["demo-llama", "demo-falcon"])
def model_dir(request, demo_models_dir):
    return demo_models_dir / request.param


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_adopt_reuses_free_slots_and_copies_running_ones(model_dir):
    info = inspect_model_dir(model_dir)
    runner = load_runner(info, 256, 3)
    first, more = _ids(40, 1), _ids(15, 2)
    runner.step([StepInput(0, first[:30], 0)])  # in two chunks, then one decoded token
    runner.step([StepInput(0, first[30:], 30)])
    runner.step([StepInput(0, [first[0]], 40)])
    fresh = load_runner(info, 256, 1).step([StepInput(9, first + more, 0)])

    # seq 0 is running: its 40 prompt tokens are copied into a free slot
    assert runner.adopt(5, first + more) == 40
    copied = runner.step([StepInput(5, more, 40)])
    torch.testing.assert_close(copied, fresh, atol=1e-4, rtol=0)
    assert runner.kv.num_free_slots == 1
    # a running prefix shorter than COPY_MIN_TOKENS is prefilled again
    assert runner.adopt(6, first[:20] + _ids(5, 3)) == 0
    runner.free(0), runner.free(5)

    # free slots: seq 0's (first + its token) and seq 5's (first + more)
    assert runner.adopt(1, first + more) == 54  # all but the last token, which must be fed
    reused = runner.step([StepInput(1, more[-1:], 54)])
    torch.testing.assert_close(reused, fresh, atol=1e-4, rtol=0)
    assert runner.adopt(2, first[:10] + more) == 10  # seq 0's slot shares 10 tokens
    runner.free(1), runner.free(2)
    assert runner.adopt(7, [first[0] + 1] + first[1:]) == 0  # a different first token shares nothing
    assert runner.kv.num_free_slots == 3


def test_a_failed_step_does_not_leave_a_reusable_prefix(model_dir, monkeypatch):
    runner = load_runner(inspect_model_dir(model_dir), 256, 1)
    prompt = _ids(20, 3)
    runner.step([StepInput(0, prompt[:10], 0)])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner.model, "forward", broken)
    with pytest.raises(RuntimeError):
        runner.step([StepInput(0, prompt[10:], 10)])
    runner.free(0)
    assert runner.adopt(1, prompt) == 10  # only what the successful step wrote


async def test_engine_reuses_a_finished_requests_prefix(model_dir):
    info = inspect_model_dir(model_dir)
    runner = load_runner(info, 256, 2)
    core = EngineCore(runner, load_tokenizer(model_dir), info.eos_token_ids, emit_batch=lambda *_: None)
    engine = ThreadEngine(core)
    client = EngineClient(engine, asyncio.get_running_loop())
    engine.start()
    try:
        prompt = ref.encode(model_dir, "Once upon a time in a land far away, there lived")
        first = ref.greedy_ids(model_dir, prompt, 8)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        deltas = [d async for d in client.add_request("a", prompt, params)]
        assert deltas[-1].num_cached_tokens == 0
        follow = prompt + first + ref.encode(model_dir, " and then")[1:]
        expected = ref.greedy_ids(model_dir, follow, 8)
        deltas = [d async for d in client.add_request("b", follow, params)]
        # the first request's prompt and its fed outputs (all but the last sampled token) are reused
        assert deltas[-1].num_cached_tokens == len(prompt) + len(first) - 1
        assert [t for d in deltas for t in d.token_ids][:len(expected)] == expected
        # prompt logprobs need every position: such a request prefills all of it
        echo = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        deltas = [d async for d in client.add_request("c", follow, echo)]
        assert deltas[-1].num_cached_tokens == 0 and len(deltas[0].prompt_logprobs) == len(follow) - 1
    finally:
        engine.shutdown(10)


async def test_identical_prompts_arriving_together_prefill_once(model_dir):
    info = inspect_model_dir(model_dir)
    runner = load_runner(info, 256, 4)
    fed: list[int] = []
    step = runner.step
    runner.step = lambda inputs: fed.append(sum(len(i.token_ids) for i in inputs)) or step(inputs)
    # a small token budget: the shared prompt takes several steps to prefill
    core = EngineCore(runner, load_tokenizer(model_dir), info.eos_token_ids, emit_batch=lambda *_: None,
                      max_num_batched_tokens=24)
    engine = ThreadEngine(core)
    client = EngineClient(engine, asyncio.get_running_loop())
    engine.start()
    try:
        prompt = _ids(90, 5)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

        async def run(rid: str):
            return [d async for d in client.add_request(rid, prompt, params)]

        results = await asyncio.gather(*(run(f"choice-{i}") for i in range(3)))
        tokens = [[t for d in r for t in d.token_ids] for r in results]
        assert tokens[0] == tokens[1] == tokens[2]
        cached = sorted(r[-1].num_cached_tokens for r in results)
        assert cached == [0, 89, 89]  # the others waited for the first's prompt and copied it
        assert sum(fed) == 90 + 2 * 1 + 3 * 5  # one prefill; each copy feeds its last prompt token
    finally:
        engine.shutdown(10)


def test_an_unrelated_prompt_overwrites_the_least_useful_slot(model_dir, monkeypatch):
    runner = load_runner(inspect_model_dir(model_dir), 256, 3)
    a, b, c, d = (_ids(40, s) for s in (11, 12, 13, 14))

    def serve(seq_id: int, prompt: list[int]) -> int:
        cached = runner.adopt(seq_id, prompt)
        runner.step([StepInput(seq_id, prompt[cached:], cached)])
        slot = runner._slot_of[seq_id]
        runner.free(seq_id)
        return slot

    slot_a = serve(0, a)
    slot_b = serve(1, b)
    assert slot_b != slot_a  # an empty slot is taken before one holding a prefix
    slot_c = serve(2, c)
    assert len({slot_a, slot_b, slot_c}) == 3
    assert serve(3, d) == slot_a  # every free slot holds a prefix: the one freed longest ago goes
    assert runner.adopt(4, b + [5]) == 40 and runner._slot_of[4] == slot_b  # b's prefix is still there
    runner.free(4)

    # a copy that fails gives its slot back, empty
    monkeypatch.setattr(runner.kv, "copy_prefix", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    runner.adopt(5, c)  # seq 5 holds c's slot (a free slot, no copy)
    with pytest.raises(RuntimeError):
        runner.adopt(6, c + [9])  # c is busy now: it would be copied
    assert runner.kv.num_free_slots == 2

    # without prefix caching (keep_prefixes off) new sequences fill the lowest free slot
    plain = load_runner(inspect_model_dir(model_dir), 256, 3)
    plain.keep_prefixes = False
    plain.step([StepInput(0, a, 0)])
    plain.free(0)
    plain.step([StepInput(1, b, 0)])
    assert plain._slot_of[1] == 0
