"""A runner on top of transformers' own `LlamaForCausalLM` / `FalconForCausalLM` modules.

It keeps one `DynamicCache` per sequence and runs the sequences of a step one after another, so several
requests make progress together (token-level interleaving) but are not batched into one matmul. It is the
correctness baseline and the fallback the batched runner is compared with.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from app.models.base import StepInput


class ReferenceRunner:
    def __init__(self, model: PreTrainedModel, max_model_len: int, max_num_seqs: int = 8) -> None:
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self._caches: dict[int, DynamicCache] = {}

    @torch.inference_mode()
    def step(self, inputs: list[StepInput]) -> torch.Tensor:
        # returns logits: fp32, inp.num_logit_rows rows per input
        rows = []
        for inp in inputs:
            cache = self._caches.get(inp.seq_id)
            if cache is None:
                cache = self._caches[inp.seq_id] = DynamicCache(config=self.model.config)
            if cache.get_seq_length() != inp.start_pos:
                raise RuntimeError(f"KV cache of sequence {inp.seq_id} is out of step")
            ids = torch.tensor([inp.token_ids], dtype=torch.long)
            pos = torch.arange(inp.start_pos, inp.start_pos + len(inp.token_ids)).unsqueeze(0)
            out = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                             logits_to_keep=inp.num_logit_rows)
            rows.append(out.logits[0, -inp.num_logit_rows:].float())
        return torch.cat(rows)

    def free(self, seq_id: int) -> None:
        self._caches.pop(seq_id, None)
