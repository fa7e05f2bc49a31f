"""The OpenAI API through the official `openai` client (sync, async, streaming) against a real server.

Content is checked against transformers' `generate()` on the same demo weights: greedy text from the
server must equal the reference text, streamed or not.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests import reference as ref

MODELS = ["demo-llama", "demo-falcon"]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="session")
def model_dirs(server):
    from app.models.demo import ensure_demo_models

    return {k: str(v) for k, v in ensure_demo_models(server.cache_dir / "demo-models").items()}


def test_models_list(client):
    models = client.models.list()
    ids = sorted(m.id for m in models.data)
    assert ids == sorted(MODELS)
    assert all(m.object == "model" and m.owned_by == "lanner" for m in models.data)
    assert client.models.retrieve("demo-llama").id == "demo-llama"


@pytest.mark.parametrize("model", MODELS)
def test_completion_matches_reference(client, model_dirs, model):
    expected, ids = ref.greedy_text(model_dirs[model], ref.encode(model_dirs[model], PROMPT), 20)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == model
    choice = out.choices[0]
    assert choice.text == expected
    assert choice.finish_reason == ("length" if len(ids) == 20 else "stop")
    assert out.usage.completion_tokens == len(ids)
    assert out.usage.prompt_tokens == len(ref.encode(model_dirs[model], PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_streamed_completion_equals_non_streamed(client, model):
    kw = dict(model=model, prompt="Once upon a time, ünïcödé 日本語 🙂", max_tokens=32, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert "\ufffd" not in text or "\ufffd" in full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == [] and chunks[-1] is usage_chunks[0]
    assert usage_chunks[0].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_chat_matches_reference_streamed_and_not(client, model_dirs, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    expected, ids = ref.greedy_text(model_dirs[model], ref.chat_ids(model_dirs[model], messages), 24)
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.completion_tokens == len(ids)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_prompt_forms(client, model_dirs):
    ids = ref.encode(model_dirs["demo-llama"], PROMPT)
    kw = dict(model="demo-llama", max_tokens=8, temperature=0)
    by_text = client.completions.create(prompt=PROMPT, **kw).choices[0].text
    assert client.completions.create(prompt=ids, **kw).choices[0].text == by_text
    multi = client.completions.create(prompt=[PROMPT, "Another prompt"], **kw)
    assert [c.index for c in multi.choices] == [0, 1] and multi.choices[0].text == by_text
    lists = client.completions.create(prompt=[ids, ids[:3]], **kw)
    assert lists.choices[0].text == by_text
    assert lists.usage.prompt_tokens == len(ids) + 3


def test_n_choices_and_seed(client):
    kw = dict(model="demo-falcon", prompt=PROMPT, max_tokens=12, n=3, temperature=1.0, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # the n choices differ
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # counted once, not n times
    greedy = client.completions.create(model="demo-falcon", prompt=PROMPT, max_tokens=12, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_stop_string_truncates_and_never_leaks(client, model_dirs):
    full = client.completions.create(model="demo-llama", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    assert len(full) > 12, full
    stop = full[8:11]
    cut = full[: full.index(stop)]
    out = client.completions.create(model="demo-llama", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="demo-llama", prompt=PROMPT, max_tokens=40, temperature=0,
                                         stop=[stop, "zzzz-never"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_stop_token_ids_and_length(client, model_dirs):
    ids = ref.greedy_ids(model_dirs["demo-llama"], ref.encode(model_dirs["demo-llama"], PROMPT), 10)
    assert len(ids) == 10
    out = client.completions.create(model="demo-llama", prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"stop_token_ids": [ids[4]]})
    first = ids.index(ids[4])
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == first + 1
    short = client.completions.create(model="demo-llama", prompt=PROMPT, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_ignore_eos_and_min_tokens(client):
    out = client.completions.create(model="demo-falcon", prompt="x", max_tokens=30, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 30 and out.choices[0].finish_reason == "length"
    out = client.completions.create(model="demo-falcon", prompt="x", max_tokens=30, temperature=0.8, seed=3,
                                    extra_body={"min_tokens": 30})
    assert out.usage.completion_tokens == 30


async def test_async_client_concurrent_requests_match_sequential(aclient, client):
    prompts = [f"Request number {i} says" for i in range(6)]
    seq = [client.completions.create(model="demo-llama", prompt=p, max_tokens=16, temperature=0).choices[0].text
           for p in prompts]
    outs = await asyncio.gather(*[aclient.completions.create(model="demo-llama", prompt=p, max_tokens=16,
                                                             temperature=0) for p in prompts])
    assert [o.choices[0].text for o in outs] == seq

    async def stream_chat(p: str) -> str:
        s = await aclient.chat.completions.create(model="demo-falcon", messages=[{"role": "user", "content": p}],
                                                  max_tokens=16, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    streamed = await asyncio.gather(*[stream_chat(p) for p in prompts])
    for p, text in zip(prompts, streamed):
        alone = client.chat.completions.create(model="demo-falcon", messages=[{"role": "user", "content": p}],
                                               max_tokens=16, temperature=0)
        assert text == alone.choices[0].message.content


def test_sse_wire_format(http):
    body = {"model": "demo-llama", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line and not line.startswith(":")]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" in e and e["object"] == "text_completion" for e in events)
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert list(events[0]) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]

    chat = {"model": "demo-falcon", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=chat) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events)
    assert lines[-1] == "data: [DONE]"


def test_client_disconnect_mid_stream_keeps_server_healthy(server, http):
    body = {"model": "demo-llama", "prompt": PROMPT, "max_tokens": 500, "stream": True, "ignore_eos": True}
    for _ in range(5):
        with http.stream("POST", "/v1/completions", json=body) as r:
            it = r.iter_lines()
            assert next(l for l in it if l.startswith("data: "))
        # leaving the block closes the connection mid-stream
    out = http.post("/v1/completions", json={"model": "demo-llama", "prompt": PROMPT, "max_tokens": 3})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    assert server.proc.poll() is None


def test_health_and_ready_are_open(server):
    import httpx

    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base_url}/ready").json()
    assert ready == {"status": "ready", "models": {"demo-llama": "ready", "demo-falcon": "ready"}}
