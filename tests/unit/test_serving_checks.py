"""Request checks of app/api/serving.py that need no model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.api.errors import InvalidRequestError
from app.api.serving import check_grammar_support, usage
from app.engine.grammar import json_grammar
from app.engine.types import SamplingParams


def test_grammars_need_a_fast_tokenizer():
    """Structured output and tool calls are enforced with the tokenizer's Rust backend: a model with a slow
    tokenizer gets a 400 naming the field, not an engine failure."""
    slow = SimpleNamespace(id="m", tokenizer=object())
    fast = SimpleNamespace(id="m", tokenizer=SimpleNamespace(backend_tokenizer=object()))
    with_grammar = SamplingParams(grammar=json_grammar(None))
    check_grammar_support(fast, with_grammar, "response_format")
    check_grammar_support(slow, SamplingParams(), "response_format")  # no grammar: nothing to check
    with pytest.raises(InvalidRequestError) as err:
        check_grammar_support(slow, with_grammar, "tools")
    assert err.value.param == "tools" and "fast" in err.value.message



def test_usage_counts_a_prompt_and_its_cached_tokens_once():
    prompts = [[1] * 100, [2] * 50]
    # n = 2: choice 1 copied what choice 0 computed; the second prompt's choices both found 10 cached
    u = usage(prompts, 7, {0: 0, 1: 99, 2: 10, 3: 10})
    assert u["prompt_tokens"] == 150 and u["total_tokens"] == 157
    assert u["prompt_tokens_details"] == {"cached_tokens": 10}
    assert usage(prompts, 0)["prompt_tokens_details"] == {"cached_tokens": 0}
