"""Structured output (app/engine/grammar.py): the grammar masks keep sampled text valid JSON that follows the
schema, on the demo models' real tokenizers, through the sampler and through the engine loop."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from app.engine.grammar import Constraint, GrammarError, grammar_tokenizer, json_grammar
from app.engine.sampler import SamplingState, sample
from app.engine.types import FinishReason, SamplingParams
from app.models.loader import inspect_model_dir, load_tokenizer
from app.models.reference import ReferenceRunner
from tests.model.test_engine import _Engine

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "cat"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(params=["demo-llama", "demo-falcon"])
def model_dir(request, demo_models_dir):
    return demo_models_dir / request.param


def test_bad_schemas_are_refused():
    for bad in ({"type": "objx"}, {"$ref": "#/nowhere"}, {"type": "string", "minLength": 5, "maxLength": 2}):
        with pytest.raises(GrammarError, match="cannot be used"):
            json_grammar(bad)
    assert json_grammar(None) and json_grammar(PERSON)


def _walk(tokenizer, vocab: int, eos: list[int], schema, seed: int, steps: int = 200,
          **params) -> tuple[list[int], bool]:
    """Sample from random logits under the schema's grammar until it finishes; (tokens, finished).

    The random "model" leans towards tokens that close strings, objects and arrays (+4): with free string
    contents (json_object keys), uniform random logits would write one endless string."""
    ll = grammar_tokenizer(tokenizer, vocab, eos)
    state = SamplingState(SamplingParams(temperature=1.0, seed=seed, **params), [], vocab, eos,
                          Constraint(ll, json_grammar(schema)))
    closing = torch.tensor([any(c in tokenizer.decode([t]) for c in '"}]') for t in range(vocab)]) * 4.0
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(steps):
        logits = torch.randn(1, vocab, generator=g) * 2 + closing
        token = sample(logits, [state])[0]
        out.append(token)
        state.append(token)
        if state.constraint.finished or token in eos:
            return out, True
    return out, False


@pytest.mark.parametrize("schema", [None, PERSON], ids=["json_object", "schema"])
def test_sampled_text_follows_the_schema(model_dir, schema):
    info = inspect_model_dir(model_dir)
    tok = load_tokenizer(model_dir)
    eos = list(info.eos_token_ids)
    for seed in range(6):
        ids, finished = _walk(tok, info.vocab_size, eos, schema, seed)
        assert finished, tok.decode(ids)
        text = tok.decode(ids, skip_special_tokens=True)
        doc = json.loads(text)
        assert isinstance(doc, dict)
        if schema is not None:
            jsonschema.validate(doc, schema)
        assert text == json.dumps(doc, separators=(",", ":"), ensure_ascii=False)  # compact


def test_without_the_grammar_the_same_walk_is_not_json(model_dir):
    info = inspect_model_dir(model_dir)
    tok = load_tokenizer(model_dir)
    g = torch.Generator().manual_seed(0)
    state = SamplingState(SamplingParams(temperature=1.0, seed=0), [], info.vocab_size, list(info.eos_token_ids))
    ids = [sample(torch.randn(1, info.vocab_size, generator=g) * 4, [state])[0] for _ in range(20)]
    with pytest.raises(ValueError):
        json.loads(tok.decode(ids, skip_special_tokens=True))


def test_min_tokens_yields_to_the_grammar(model_dir):
    # a finished document allows only EOS: min_tokens must not ban it (the row would have no token left)
    info = inspect_model_dir(model_dir)
    tok = load_tokenizer(model_dir)
    ids, finished = _walk(tok, info.vocab_size, list(info.eos_token_ids), {"type": "object", "maxProperties": 0},
                          seed=1, min_tokens=50)
    assert finished and tok.decode(ids, skip_special_tokens=True) == "{}"


async def test_engine_finishes_when_the_document_is_complete(model_dir):
    engine = _Engine(model_dir, runner_cls=ReferenceRunner)
    try:
        prompt = engine.tokenizer.encode("Describe a person as JSON:")
        for seed in range(3):
            params = SamplingParams(max_tokens=120, temperature=0.9, seed=seed, grammar=json_grammar(PERSON))
            text, ids, reason = await engine.run(f"json-{seed}", prompt, params)
            assert reason == FinishReason.STOP, text
            jsonschema.validate(json.loads(text), PERSON)
        # an ordinary request on the same engine is unaffected
        _, _, reason = await engine.run("plain", prompt, SamplingParams(max_tokens=5, temperature=0.0))
        assert reason in (FinishReason.LENGTH, FinishReason.STOP)
    finally:
        engine.close()


def test_auto_tool_grammar_takes_text_or_one_call(demo_models_dir):
    from app.api.tools import ToolPlan
    from app.protocol.openai import ChatCompletionRequest

    tok = load_tokenizer(demo_models_dir / "demo-llama")
    info = inspect_model_dir(demo_models_dir / "demo-llama")
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[tool])
    plan = ToolPlan.of(body)
    assert plan.mode == "auto" and plan.finish_reason == "tool_calls"
    ll = grammar_tokenizer(tok, info.vocab_size, list(info.eos_token_ids))

    def accepts(text: str) -> bool:
        m = Constraint(ll, plan.grammar)
        try:
            for t in tok.encode(text, add_special_tokens=False):
                m.accept(t)
        except GrammarError:
            return False
        return True

    assert accepts("Hello {there}") and accepts('{"name":"add","parameters":{"a":2}}')
    assert not accepts('{"name":"mul","parameters":{"a":2}}')  # not a tool
    assert not accepts('{"name":"add","parameters":{"a":"two"}}')  # not its schema
    assert not accepts('{"greeting": "hi"}')  # text cannot start with "{"
    [call] = plan.calls('{"name":"add","parameters":{"a":2}}')
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2}
    assert plan.calls("Hello {there}") is None and plan.calls('{"name":"add","param') is None


def test_tool_schemas_with_defs_work_in_every_mode(demo_models_dir):
    """Pydantic-made tool schemas (the OpenAI SDK's pydantic_function_tool, LangChain) keep nested models in
    $defs; wrapped into one call schema, their $refs must still resolve."""
    from pydantic import BaseModel

    from app.api.tools import ToolPlan
    from app.protocol.openai import ChatCompletionRequest

    class Place(BaseModel):
        city: str
        zone: int

    class Trip(BaseModel):
        start: Place
        stops: list[Place]

    tok = load_tokenizer(demo_models_dir / "demo-llama")
    info = inspect_model_dir(demo_models_dir / "demo-llama")
    ll = grammar_tokenizer(tok, info.vocab_size, list(info.eos_token_ids))
    params = Trip.model_json_schema()
    assert "$defs" in params and "$ref" in json.dumps(params)
    same = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/properties/a"}}}
    tools = [{"type": "function", "function": {"name": "plan", "parameters": params}},
             {"type": "function", "function": {"name": "pair", "parameters": same}}]
    args = {"start": {"city": "Oslo", "zone": 1}, "stops": [{"city": "Rome", "zone": 2}]}
    bad = {"start": {"city": "Oslo", "zone": 1}, "stops": [{"city": "Rome", "zone": "two"}]}  # Place.zone: int
    forms = {"auto": lambda a: {"name": "plan", "parameters": a},
             "required": lambda a: [{"name": "pair", "arguments": {"a": 1, "b": 2}}, {"name": "plan", "arguments": a}],
             "named": lambda a: a}

    def follows(grammar: str, doc) -> bool:
        m = Constraint(ll, grammar)
        try:
            for t in tok.encode(json.dumps(doc, separators=(",", ":")), add_special_tokens=False):
                m.accept(t)
        except GrammarError:
            return False
        return True

    for mode, form in forms.items():
        choice = {"type": "function", "function": {"name": "plan"}} if mode == "named" else mode
        body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=tools,
                                     tool_choice=choice)
        plan = ToolPlan.of(body)
        assert follows(plan.grammar, form(args)), mode
        assert not follows(plan.grammar, form(bad)), mode


def test_unusual_tool_schemas_compile_or_are_refused_cleanly(demo_models_dir):
    from app.api.tools import ToolPlan
    from app.protocol.openai import ChatCompletionRequest

    tok = load_tokenizer(demo_models_dir / "demo-llama")
    info = inspect_model_dir(demo_models_dir / "demo-llama")
    ll = grammar_tokenizer(tok, info.vocab_size, list(info.eos_token_ids))
    clash = {"type": "object", "properties": {"a": {"$ref": "#/$defs/X"}, "b": {"$ref": "#/definitions/X"}},
             "required": ["a", "b"], "additionalProperties": False,
             "$defs": {"X": {"type": "integer"}}, "definitions": {"X": {"type": "string"}}}
    data = {"type": "object", "properties": {"k": {"const": {"$ref": "#/x"}}}, "required": ["k"],
            "additionalProperties": False}
    with_id = {"$id": "https://example.com/p", "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
               "$defs": {"P": {"type": "integer"}}, "required": ["p"], "additionalProperties": False}
    odd = {"type": "object", "$defs": "not an object", "properties": {}}
    for choice in ("auto", "required"):
        for schema in (clash, data, with_id, odd):
            body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tool_choice=choice,
                                         tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
            try:
                plan = ToolPlan.of(body)
            except GrammarError:
                continue  # refused with a reason: a 400
            if schema is clash:  # $defs/X and definitions/X are different types
                form = (lambda a: {"name": "f", "parameters": a}) if choice == "auto" else (
                    lambda a: [{"name": "f", "arguments": a}])
                for args, ok in (({"a": 1, "b": "s"}, True), ({"a": "s", "b": 1}, False)):
                    m = Constraint(ll, plan.grammar)
                    try:
                        for t in tok.encode(json.dumps(form(args), separators=(",", ":")), add_special_tokens=False):
                            m.accept(t)
                        assert ok, args
                    except GrammarError:
                        assert not ok, args
            if schema is data:  # the const value is data: left as it is
                assert '"$ref":"#/x"' in plan.grammar.replace(" ", "") or "#/x" in plan.grammar
