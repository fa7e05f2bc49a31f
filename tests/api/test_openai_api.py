"""The OpenAI API through the official `openai` client (sync, async, streaming) against a real server.

Content is checked against transformers' `generate()` on the same demo weights: greedy text from the
server must equal the reference text, streamed or not.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

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


@pytest.mark.parametrize("model", MODELS)
def test_logit_bias_matches_reference(client, model_dirs, model):
    tok, _ = ref.load(model_dirs[model])
    prompt_ids = ref.encode(model_dirs[model], PROMPT)
    ids = ref.greedy_ids(model_dirs[model], prompt_ids, 12)
    ordinary = [t for t in range(len(tok)) if t not in tok.all_special_ids and t not in ids]
    # ban the greedy path's first two tokens and lift another one, as transformers' sequence_bias does
    bias = {ids[0]: -100.0, ids[1]: -100.0, ordinary[len(ordinary) // 2]: 4.5}
    expected = ref.greedy_ids(model_dirs[model], prompt_ids, 12, sequence_bias={(t,): b for t, b in bias.items()})
    assert expected != ids and ids[0] not in expected and ids[1] not in expected
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                    logit_bias={str(t): b for t, b in bias.items()})
    assert out.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(expected)
    # +100 wins every draw, even sampled; the chat API takes the same field
    forced = ordinary[-1]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0.9, seed=5, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == tok.decode([forced] * 6)
    assert chat.usage.completion_tokens == 6


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("model", MODELS)
def test_response_format_json_schema(client, model):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    kw = dict(model=model, messages=[{"role": "user", "content": "A person, as JSON"}], max_tokens=150,
              temperature=0.8, seed=11, response_format=fmt)
    out = client.chat.completions.create(**kw)
    doc = json.loads(out.choices[0].message.content)
    jsonschema.validate(doc, PERSON_SCHEMA)
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == out.choices[0].message.content  # seeded: the same document, streamed
    # the completions endpoint takes it too (as vLLM's does), and json_object asks for any object
    text = client.completions.create(model=model, prompt="{", max_tokens=150, temperature=0.8, seed=3,
                                     extra_body={"response_format": fmt}).choices[0].text
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    obj = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "{}"}], max_tokens=150,
                                         temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":  # a random model may fill a free-form key until max_tokens
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "maximum": 12,
                                                                                 "minimum": -12}},
                                       "required": ["zone"], "additionalProperties": False}}}


def _check_call(call, tools=(WEATHER, TIME)):
    import jsonschema

    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.type == "function" and call.id.startswith("call_")


def _streamed_calls(chunks):
    """Assemble streamed tool_calls deltas the way the SDK's clients do (by index, arguments concatenated)."""
    calls, finish = {}, None
    for c in chunks:
        if not c.choices:
            continue
        for d in c.choices[0].delta.tool_calls or ():
            entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = d.id or entry["id"]
            if d.function is not None:
                entry["name"] = d.function.name or entry["name"]
                entry["arguments"] += d.function.arguments or ""
        assert not c.choices[0].delta.content
        finish = c.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("model", MODELS)
def test_forced_tool_calls(client, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=120,
              temperature=0.7, seed=4, tools=[WEATHER, TIME])
    named = client.chat.completions.create(
        **kw, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = named.choices[0].message
    assert msg.content is None and len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
    _check_call(msg.tool_calls[0])
    assert named.choices[0].finish_reason == "stop"  # as OpenAI answers a forced function
    calls, finish = _streamed_calls(client.chat.completions.create(
        **kw, tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", msg.tool_calls[0].function.arguments)]
    assert finish == "stop" and calls[0]["id"].startswith("call_")

    required = client.chat.completions.create(**kw, tool_choice="required", parallel_tool_calls=False)
    msg = required.choices[0].message
    assert required.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert len(msg.tool_calls) == 1
    _check_call(msg.tool_calls[0])
    calls, finish = _streamed_calls(client.chat.completions.create(
        **kw, tool_choice="required", parallel_tool_calls=False, stream=True))
    assert [(c["name"], c["arguments"]) for c in calls] == [(msg.tool_calls[0].function.name,
                                                             msg.tool_calls[0].function.arguments)]
    assert finish == "tool_calls"


@pytest.mark.parametrize("model", MODELS)
def test_auto_tool_choice_answers_text_or_a_call(client, model_dirs, model):
    tok, _ = ref.load(model_dirs[model])
    kw = dict(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=60,
              temperature=0.7, seed=9, tools=[WEATHER, TIME])  # tool_choice defaults to 'auto'
    text = client.chat.completions.create(**kw)
    msg = text.choices[0].message
    # this random model does not open with "{": a text answer, streamed as usual
    assert msg.tool_calls is None and msg.content and not msg.content.startswith("{")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == msg.content
    # pushed to open with "{", the same model writes a call (Llama 3.1's form) that follows a tool's schema
    brace = {str(i): 100 for i in tok.encode("{", add_special_tokens=False)}
    call = client.chat.completions.create(**kw, logit_bias=brace)
    assert call.choices[0].finish_reason == "tool_calls" and call.choices[0].message.content is None
    assert len(call.choices[0].message.tool_calls) == 1
    _check_call(call.choices[0].message.tool_calls[0])
    calls, finish = _streamed_calls(client.chat.completions.create(**kw, logit_bias=brace, stream=True))
    got = call.choices[0].message.tool_calls[0].function
    assert [(c["name"], c["arguments"]) for c in calls] == [(got.name, got.arguments)] and finish == "tool_calls"


def test_tool_results_go_through_the_chat_template(client, model_dirs):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city":"Paris","unit":"C"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    out = client.chat.completions.create(model="demo-llama", messages=messages, max_tokens=5, temperature=0,
                                         tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    # the demo template renders each message's role and content (tool calls themselves it ignores)
    rendered = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": ""},
                {"role": "tool", "content": "21 degrees and sunny"}]
    assert out.usage.prompt_tokens == len(ref.chat_ids(model_dirs["demo-llama"], rendered))


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


# ------------------------------------------------------------------ logprobs and echo


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_and_echo_match_reference(client, model_dirs, stream):
    """What lm-eval-harness's loglikelihood requests send: echo + logprobs, greedy, 1 token. Every prompt
    token after the first, and the generated one, carry transformers' log_softmax; top_logprobs holds the
    best alternatives (plus the chosen token) keyed by token text; text_offset walks the echoed text."""
    model = "demo-llama"
    prompt_ids = ref.encode(model_dirs[model], PROMPT)
    kw = dict(model=model, prompt=prompt_ids, max_tokens=1, temperature=0, logprobs=2, echo=True)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
        text = "".join(c.text for c in chunks)
        lp = {k: sum((getattr(c.logprobs, k) for c in chunks if c.logprobs), []) for k in
              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        choice = client.completions.create(**kw).choices[0]
        text, lp = choice.text, choice.logprobs.model_dump()
    tok, _ = ref.load(model_dirs[model])
    generated = ref.greedy_ids(model_dirs[model], prompt_ids, 1)
    all_ids = prompt_ids + generated
    rows = ref.log_softmax_rows(model_dirs[model], all_ids)
    assert text == tok.decode(prompt_ids) + tok.decode(generated)
    assert lp["tokens"] == [tok.decode([t]) for t in all_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for k, t in enumerate(all_ids[1:]):
        assert lp["token_logprobs"][k + 1] == pytest.approx(rows[k][t].item(), abs=1e-4)
        best = torch.topk(rows[k], 2)
        want = {tok.decode([i]): v for i, v in zip(best.indices.tolist(), best.values.tolist())}
        want.setdefault(tok.decode([t]), rows[k][t].item())
        assert lp["top_logprobs"][k + 1] == pytest.approx(want, abs=1e-4)
    # the generated (greedy) token is the best one: lm-eval's is_greedy check
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:k]) for k in range(len(all_ids))]


@pytest.mark.parametrize("stream", [False, True])
def test_echoed_text_prompt_offsets_point_into_the_text(client, model_dirs, stream):
    """A text prompt is echoed as sent. The BOS the tokenizer adds is among the tokens but not in the text, so
    it takes no characters, and every prompt token's text_offset points at that token's text."""
    model = "demo-llama"
    kw = dict(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
        text = "".join(c.text for c in chunks)
        tokens = sum((c.logprobs.tokens for c in chunks if c.logprobs), [])
        offsets = sum((c.logprobs.text_offset for c in chunks if c.logprobs), [])
    else:
        choice = client.completions.create(**kw).choices[0]
        text, tokens, offsets = choice.text, choice.logprobs.tokens, choice.logprobs.text_offset
    tok, _ = ref.load(model_dirs[model])
    prompt_ids = ref.encode(model_dirs[model], PROMPT)
    assert prompt_ids[0] == tok.bos_token_id and tokens[0] == tok.bos_token
    assert text.startswith(PROMPT) and offsets[:2] == [0, 0]
    for k in range(1, len(prompt_ids)):
        assert text[offsets[k]:offsets[k] + len(tokens[k])] == tokens[k], k
    assert offsets[len(prompt_ids)] == len(PROMPT)  # the first generated token starts right after the echo
    assert offsets == sorted(offsets) and len(tokens) == len(prompt_ids) + 3


def test_completion_logprobs_without_echo(client, model_dirs):
    model = "demo-falcon"
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    prompt_ids = ref.encode(model_dirs[model], PROMPT)
    ids = ref.greedy_ids(model_dirs[model], prompt_ids, 5)
    rows = ref.log_softmax_rows(model_dirs[model], prompt_ids + ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and "".join(lp.tokens) == out.choices[0].text
    for k, t in enumerate(ids):
        assert lp.token_logprobs[k] == pytest.approx(rows[len(prompt_ids) - 1 + k][t].item(), abs=1e-4)
        assert list(lp.top_logprobs[k]) == [lp.tokens[k]]  # logprobs=0: only the chosen token
    assert lp.text_offset[0] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_match_reference(client, model_dirs, stream):
    model = "demo-llama"
    messages = [{"role": "user", "content": "Dis quelque chose en 日本語"}]
    kw = dict(model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    if stream:
        chunks = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        text = "".join(c.delta.content or "" for c in chunks)
        content = [e for c in chunks if c.logprobs for e in c.logprobs.content]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        text, content = choice.message.content, choice.logprobs.content
    prompt_ids = ref.chat_ids(model_dirs[model], messages)
    ids = ref.greedy_ids(model_dirs[model], prompt_ids, 6)
    rows = ref.log_softmax_rows(model_dirs[model], prompt_ids + ids)
    tok, _ = ref.load(model_dirs[model])
    assert len(content) == len(ids)
    for k, (t, entry) in enumerate(zip(ids, content)):
        row = rows[len(prompt_ids) - 1 + k]
        assert entry.token == tok.decode([t]) and entry.logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token or "\ufffd" in entry.token
        best = torch.topk(row, 3)
        assert [a.token for a in entry.top_logprobs] == [tok.decode([i]) for i in best.indices.tolist()]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    # the bytes are the tokens' real bytes: joined, they decode to the text even across split characters
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace") == tok.decode(ids)
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_tokenize_and_detokenize(http, model_dirs):
    model_dir = model_dirs["demo-llama"]
    r = http.post("/tokenize", json={"model": "demo-llama", "prompt": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == ref.encode(model_dir, PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == http.get("/v1/models/demo-llama").json()["max_model_len"]
    bare = http.post("/tokenize", json={"model": "demo-llama", "prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == body["tokens"][1:]  # without the BOS
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    chat = http.post("/tokenize", json={"model": "demo-llama", "messages": messages}).json()
    assert chat["tokens"] == ref.chat_ids(model_dir, messages)
    # the same count as the chat endpoint's usage
    usage = http.post("/v1/chat/completions", json={"model": "demo-llama", "messages": messages,
                                                    "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == chat["count"]
    text = http.post("/detokenize", json={"model": "demo-llama", "tokens": bare["tokens"]}).json()
    assert text == {"prompt": PROMPT}
    for path, bad, param in [("/detokenize", {"tokens": [10**9]}, "tokens"), ("/tokenize", {}, "prompt"),
                             ("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
                             ("/tokenize", {"messages": messages, "tools": [{"type": "function", "function": {
                                 "name": "f"}}] * 2}, "tools")]:
        r = http.post(path, json={"model": "demo-llama", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize("model", MODELS)
def test_multi_turn_chat_reuses_the_cached_prefix(client, model_dirs, model):
    turns = [{"role": "system", "content": "You are a helpful assistant who answers in short sentences."},
             {"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model=model, messages=turns, max_tokens=12, temperature=0)
    turns += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(model=model, messages=turns, max_tokens=12, temperature=0)
    prompt = ref.chat_ids(model_dirs[model], turns)
    expected, _ = ref.greedy_text(model_dirs[model], prompt, 12)
    assert second.choices[0].message.content == expected  # as a full prefill would give
    assert second.usage.prompt_tokens == len(prompt)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # at least the first turn's prompt (the template re-renders the assistant turn, so maybe not all of it)
    assert first.usage.prompt_tokens <= cached < len(prompt), (cached, first.usage.prompt_tokens)


def test_a_running_requests_prefix_is_shared(client, model_dirs):
    system = {"role": "system", "content": "You are the assistant of a shop that sells boats, sails, ropes and "
                                           "anchors. Answer politely, briefly, and in English."}
    running = client.chat.completions.create(model="demo-falcon", messages=[system, {"role": "user", "content": "Hi"}],
                                             max_tokens=200, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    next(c for c in running if c.choices and c.choices[0].delta.content)  # it is decoding now
    turns = [system, {"role": "user", "content": "Do you sell anchors?"}]
    out = client.chat.completions.create(model="demo-falcon", messages=turns, max_tokens=10, temperature=0)
    rest = "".join(c.choices[0].delta.content or "" for c in running if c.choices)
    assert rest
    prompt = ref.chat_ids(model_dirs["demo-falcon"], turns)
    assert out.choices[0].message.content == ref.greedy_text(model_dirs["demo-falcon"], prompt, 10)[0]
    shared = len(ref.chat_ids(model_dirs["demo-falcon"], [system])) - 1  # up to the user turn (no gen prompt)
    assert shared >= 32 and out.usage.prompt_tokens_details.cached_tokens >= shared, (shared, out.usage)


def test_a_text_reply_has_no_tool_calls_key(http):
    r = http.post("/v1/chat/completions", json={"model": "demo-llama", "max_tokens": 3,
                                                "messages": [{"role": "user", "content": "hi"}]})
    message = r.json()["choices"][0]["message"]
    assert set(message) == {"role", "content", "refusal"}, message  # OpenAI's shape: no "tool_calls": null
