"""Reference results from transformers' own implementation, for content assertions in tests."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


@functools.lru_cache(maxsize=4)
def load(model_dir: str):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def greedy_ids(model_dir: Path | str, prompt_ids: list[int], max_new_tokens: int, **generate_kw) -> list[int]:
    """Greedy continuation with `generate()`, stopping at the model's EOS ids (EOS included, as counted).
    `generate_kw` goes to `generate()` (e.g. sequence_bias)."""
    tok, model = load(str(model_dir))
    gen = GenerationConfig.from_pretrained(model_dir)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=gen.eos_token_id,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0, **generate_kw)
    return out[0, len(prompt_ids):].tolist()


def greedy_text(model_dir: Path | str, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
    tok, _ = load(str(model_dir))
    ids = greedy_ids(model_dir, prompt_ids, max_new_tokens)
    return tok.decode(ids, skip_special_tokens=True), ids


def encode(model_dir: Path | str, text: str) -> list[int]:
    tok, _ = load(str(model_dir))
    return tok.encode(text, add_special_tokens=True)


def chat_ids(model_dir: Path | str, messages: list[dict]) -> list[int]:
    tok, _ = load(str(model_dir))
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def log_softmax_rows(model_dir: Path | str, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of `ids`: row t scores token t + 1."""
    _, model = load(str(model_dir))
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
