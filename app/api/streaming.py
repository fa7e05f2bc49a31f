"""Engine deltas -> OpenAI SSE chunks, ending with `data: [DONE]`.

Chunk shapes follow OpenAI exactly: chat streams open each choice with a delta carrying the role, content
deltas follow, and a last delta `{}` carries finish_reason. With `stream_options.include_usage`, every chunk
has `"usage": null` and one extra chunk with empty `choices` carries the totals. An error after the stream
started is sent as an `{"error": ...}` event before `[DONE]`. A client disconnect cancels the generator,
which closes the engine iterators and so aborts the requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from sse_starlette import EventSourceResponse

from app.api.errors import APIError, count_failure, error_body
from app.api.logprobs import chat_logprobs, completion_logprobs, completion_piece, token_strings
from app.api.serving import Admitted, stream_jobs, usage
from app.api.tools import ToolPlan, new_call_id

DONE = "[DONE]"


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_response(events: AsyncIterator[str]) -> EventSourceResponse:
    # X-Accel-Buffering: no keeps nginx (and similar proxies) from buffering the stream.
    return EventSourceResponse(
        ({"data": e} async for e in events),
        sep="\n",
        ping=15,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def stream_choices(
    kind: Literal["completion", "chat"],
    req: Admitted,
    prompts: list[list[int]],
    *,
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
    fingerprint: str,
    logprobs: bool = False,
    echo: list[str] | None = None,
    tools: ToolPlan | None = None,
) -> AsyncIterator[str]:
    """`logprobs`: attach each delta's token logprobs; `echo` (completions): each prompt's text, sent
    ahead of its choices' first tokens (with the prompt tokens' logprobs when `logprobs`); `tools` (chat):
    the reply may be a tool call, sent as `tool_calls` deltas (app/api/tools.py)."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    strings = token_strings(req.handle.tokenizer) if logprobs else None
    jobs = {job.index: job for job in req.jobs}
    n = len(req.jobs) // max(1, len(prompts))
    offsets: dict[int, int] = {}  # completions: text offset of a choice's next token
    base: dict[str, Any] = {"id": response_id, "object": obj, "created": created, "model": model,
                            "system_fingerprint": fingerprint}

    def chunk(choice: dict[str, Any]) -> str:
        c = {**base, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return _dumps(c)

    if kind == "chat":
        opening = "" if tools is None or tools.mode == "auto" else None  # a forced call has no content
        for job in req.jobs:
            yield chunk({"index": job.index, "delta": {"role": "assistant", "content": opening},
                         "logprobs": None, "finish_reason": None})
    pending: dict[int, str] = {}  # tool calls: the text of each choice so far
    texts: set[int] = set()  # tool_choice 'auto': the choices that answered with text
    output_tokens: dict[int, int] = {}
    cached_tokens: dict[int, int] = {}
    try:
        async for index, delta in stream_jobs(req):
            output_tokens[index] = delta.num_output_tokens
            cached_tokens[index] = delta.num_cached_tokens
            finish = delta.finish_reason.value if delta.finish_reason is not None else None
            if kind == "completion":
                first = index not in offsets
                text, entries = completion_piece(
                    delta.text, delta.logprobs, echo=echo[index // n] if echo is not None and first else None,
                    prompt_ids=jobs[index].prompt_ids, prompt_logprobs=delta.prompt_logprobs,
                    with_logprobs=logprobs)
                lp_obj = None
                if logprobs:
                    lp_obj, offsets[index] = completion_logprobs(strings, entries, offsets.get(index, 0), text)
                else:
                    offsets.setdefault(index, 0)
                if text or finish or entries:
                    yield chunk({"index": index, "text": text, "logprobs": lp_obj, "finish_reason": finish})
                continue
            if tools is not None and _is_tool_delta(tools, index, delta.text, pending, texts):
                for out in _tool_chunks(tools, index, delta.text, finish, pending):
                    yield chunk(out)
                continue
            if delta.text or (logprobs and delta.logprobs):
                lp_obj = {"content": chat_logprobs(strings, delta.logprobs or ()), "refusal": None} if logprobs else None
                yield chunk({"index": index, "delta": {"content": delta.text}, "logprobs": lp_obj,
                             "finish_reason": None})
            if finish:
                yield chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish})
    except APIError as exc:
        count_failure(exc.status_code, req.handle.metrics)
        yield _dumps(error_body(exc.message, exc.type, exc.param, exc.code))
        yield DONE
        return
    if include_usage:
        yield _dumps({**base, "choices": [], "usage": usage(prompts, sum(output_tokens.values()),
                                                                    cached_tokens)})
    yield DONE


def _is_tool_delta(tools: ToolPlan, index: int, text: str, pending: dict[int, str], texts: set[int]) -> bool:
    """Whether a choice's delta belongs to a tool call: always for a forced call; for 'auto', decided by the
    choice's first text (a call starts with `{`)."""
    if tools.mode != "auto" or index in pending:
        return True
    if index in texts or not text:
        return False
    if tools.is_call(text):
        return True
    texts.add(index)
    return False


def _tool_chunks(tools: ToolPlan, index: int, text: str, finish: str | None,
                 pending: dict[int, str]) -> list[dict[str, Any]]:
    """The choice deltas of a tool call for one engine delta (`pending` holds each call's text so far). A
    named function's call opens with its id and name, then streams its arguments; 'required' and 'auto'
    calls are sent whole once complete (or, cut short by max_tokens, the text as content)."""
    out: list[dict[str, Any]] = []

    def delta(d: dict[str, Any], reason: str | None = None) -> None:
        out.append({"index": index, "delta": d, "logprobs": None, "finish_reason": reason})

    if tools.mode == "named":
        if index not in pending:
            pending[index] = ""
            delta({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                   "function": {"name": tools.named, "arguments": ""}}]})
        if text:
            delta({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        if finish:
            delta({}, tools.finish_reason if finish == "stop" else finish)
        return out
    pending[index] = pending.get(index, "") + text
    if finish:
        calls = tools.calls(pending[index]) if finish == "stop" else None
        if calls is None:
            delta({"content": pending[index]})
            delta({}, finish)
        else:
            delta({"tool_calls": [{"index": i, **c.model_dump()} for i, c in enumerate(calls)]})
            delta({}, tools.finish_reason)
    return out
