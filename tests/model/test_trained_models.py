"""bench/train_models.py: the trained test models are deterministic, reused by recipe, and really trained."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from bench import train_models
from bench.train_models import MARKER_FILE, RECIPES, ensure_trained

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)


@pytest.fixture
def tiny_recipes(monkeypatch):
    """Small recipes (a few seconds) in place of the real ones."""
    recipes = {
        "tiny-llama": replace(RECIPES["trained-llama"], name="tiny-llama", steps=30, warmup=3, batch=4,
                              seq_len=32, shape=dict(TINY, num_key_value_heads=1, intermediate_size=128)),
        "tiny-falcon": replace(RECIPES["trained-falcon"], name="tiny-falcon", steps=30, warmup=3, batch=4, seq_len=32,
                               shape=dict(TINY)),
    }
    recipes["untrained-tiny-llama"] = replace(recipes["tiny-llama"], name="untrained-tiny-llama", steps=0)
    monkeypatch.setattr(train_models, "RECIPES", recipes)
    return recipes


def test_training_is_deterministic_and_lowers_the_loss(tiny_recipes, tmp_path):
    for name in ("tiny-llama", "tiny-falcon"):
        a, b = ensure_trained(name, tmp_path / "a"), ensure_trained(name, tmp_path / "b")
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        marker = json.loads((a / MARKER_FILE).read_text())
        assert marker["recipe"]["name"] == name and marker["recipe"]["steps"] == 30
    trained = json.loads((tmp_path / "a" / "tiny-llama" / MARKER_FILE).read_text())["loss"]
    untrained = json.loads((ensure_trained("untrained-tiny-llama", tmp_path) / MARKER_FILE).read_text())["loss"]
    assert untrained > 6.5 and trained < untrained - 0.5, (trained, untrained)  # ln(1024) = 6.93 at init


def test_a_directory_is_reused_only_for_the_same_recipe_and_threads(tiny_recipes, tmp_path, monkeypatch):
    path = ensure_trained("tiny-llama", tmp_path)
    calls = []
    real_train = train_models.train
    monkeypatch.setattr(train_models, "train", lambda recipe, progress=None: calls.append(recipe) or
                        real_train(recipe, progress))
    assert ensure_trained("tiny-llama", tmp_path) == path and calls == []
    tiny_recipes["tiny-llama"] = replace(tiny_recipes["tiny-llama"], steps=31)
    ensure_trained("tiny-llama", tmp_path)
    assert [r.steps for r in calls] == [31]
    assert json.loads((path / MARKER_FILE).read_text())["recipe"]["steps"] == 31
    threads = torch.get_num_threads()
    try:  # another thread count sums in another order: other weights, so not reused
        torch.set_num_threads(1 if threads > 1 else 2)
        ensure_trained("tiny-llama", tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert [r.steps for r in calls] == [31, 31]
