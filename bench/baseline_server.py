"""Baseline server: Hugging Face `model.generate()`, one request at a time ("the seeds' approach").

A minimal OpenAI-compatible /v1/completions server (FastAPI + uvicorn) that loads the model with
transformers in fp32 and serves requests strictly one after another from a single generation thread:
a request waits in line while another is generating, which is exactly what makes this approach
scale badly with concurrent users. Within that design it is not a strawman:

* fp32 weights, `torch.inference_mode()`, `torch.set_num_threads(<usable cores>)`, transformers' own
  KV cache (`model.generate` with `use_cache=True`);
* temperature 0 = greedy (`do_sample=False`); otherwise temperature/top_p sampling;
* `ignore_eos` -> `min_new_tokens=max_tokens` (EOS is masked until max_tokens);
* streaming sends text after every token (a `TextIteratorStreamer`-style streamer that does not wait
  for a space like the stock one, so TTFT/ITL are not inflated by word buffering); incomplete UTF-8
  is held back;
* with `stream_options.include_usage`, a final chunk with empty `choices` carries the token counts.

    python bench/baseline_server.py --model DIR --model-id ID --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import AsyncTextIteratorStreamer, AutoModelForCausalLM, AutoTokenizer


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int]
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class TokenStreamer(AsyncTextIteratorStreamer):
    """Queues the new text after every generated token and counts the generated tokens.

    Built on transformers' asyncio streamer (an `asyncio.Queue` fed with `call_soon_threadsafe`), so
    waiting requests hold no threads. Create it inside the event loop.
    """

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.num_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        ids = value.reshape(-1).tolist()  # batch size 1
        self.num_tokens += len(ids)
        self.token_cache.extend(ids)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        new, self.print_len = text[self.print_len:], len(text)
        if new:
            self.on_finalized_text(new)


@dataclass
class Generation:
    """One request's generation, run on the single worker thread."""

    streamer: TokenStreamer
    prompt_tokens: int
    done: asyncio.Future[None] | None = None
    finish_reason: str = "length"


class BaselineEngine:
    """Loads the model and runs `generate()` for one request at a time on a single thread."""

    def __init__(self, model_dir: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eos_ids = self._eos_ids()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def encode(self, prompt: str | list[int]) -> torch.Tensor:
        ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    def start(self, req: CompletionRequest) -> Generation:
        """Queue a generation; its streamer yields text, `done` resolves when generate() returns."""
        input_ids = self.encode(req.prompt)
        gen = Generation(streamer=TokenStreamer(self.tokenizer), prompt_tokens=input_ids.shape[1])
        loop = asyncio.get_running_loop()
        gen.done = loop.run_in_executor(self._executor, self._generate, req, input_ids, gen)
        return gen

    def _generate(self, req: CompletionRequest, input_ids: torch.Tensor, gen: Generation) -> None:
        kwargs: dict[str, Any] = {"max_new_tokens": req.max_tokens, "do_sample": req.temperature > 0}
        if req.temperature > 0:
            kwargs.update(temperature=req.temperature, top_p=req.top_p, top_k=0)
        if req.ignore_eos:
            kwargs["min_new_tokens"] = req.max_tokens
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), streamer=gen.streamer,
                    pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **kwargs,
                )
            last = int(out[0, -1])
            stopped = gen.streamer.num_tokens < req.max_tokens or last in self.eos_ids
            gen.finish_reason = "stop" if stopped and not req.ignore_eos else "length"
        finally:
            gen.streamer.end()


def _usage(gen: Generation) -> dict[str, int]:
    n = gen.streamer.num_tokens
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}


async def sse_events(gen: Generation, req: CompletionRequest, model_id: str) -> AsyncIterator[str]:
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = {**base, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async for text in gen.streamer:
        if not text:  # end() flushes an empty string
            continue
        yield event([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])
    await gen.done  # type: ignore[misc]
    yield event([{"index": 0, "text": "", "logprobs": None, "finish_reason": gen.finish_reason}])
    if include_usage:
        yield event([], _usage(gen))
    yield "data: [DONE]\n\n"


def create_app(engine: BaselineEngine, model_id: str) -> FastAPI:
    app = FastAPI(title="HF generate() baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "bench"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> StreamingResponse | JSONResponse:
        if req.model != model_id:
            raise HTTPException(404, f"model {req.model!r} not found")
        gen = engine.start(req)
        if req.stream:
            return StreamingResponse(sse_events(gen, req, model_id), media_type="text/event-stream")
        parts = [text async for text in gen.streamer]
        await gen.done  # type: ignore[misc]
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "text": "".join(parts), "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": _usage(gen),
        })

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model directory")
    parser.add_argument("--model-id", required=True, help="the id clients send as `model`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: usable cores)")
    args = parser.parse_args(argv)
    engine = BaselineEngine(args.model, args.threads)
    print(f"baseline: serving {args.model_id} from {args.model} on http://{args.host}:{args.port} "
          f"({args.threads} torch threads, one request at a time)", flush=True)
    uvicorn.run(create_app(engine, args.model_id), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
