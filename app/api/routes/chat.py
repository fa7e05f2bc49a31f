"""POST /v1/chat/completions: messages go through the model's own chat template."""

from __future__ import annotations

import dataclasses
import json
import re

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.api.deps import RegistryDep, SettingsDep
from app.api.errors import InvalidRequestError
from app.api.logprobs import chat_logprobs, token_strings
from app.api.serving import (
    Deadlines,
    admit,
    check_grammar_support,
    check_sampling_token_ids,
    collect_jobs,
    get_model,
    make_jobs,
    resolve_max_tokens,
    usage,
)
from app.api.streaming import sse_response, stream_choices
from app.api.tools import ToolPlan, template_message, template_tools
from app.engine.grammar import GrammarError
from app.engine.registry import ModelHandle
from app.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    new_id,
    now,
)

router = APIRouter()


def render_chat(handle: ModelHandle, body: ChatCompletionRequest) -> list[int]:
    tok = handle.tokenizer
    if not getattr(tok, "chat_template", None):
        raise InvalidRequestError(f"The model `{handle.id}` has no chat template; use /v1/completions.",
                                  param="messages")
    messages = [template_message("system" if m.role == "developer" else m.role, m.text(), m) for m in body.messages]
    continue_final = not body.add_generation_prompt and messages[-1]["role"] == "assistant"
    kwargs = {"add_generation_prompt": bool(body.add_generation_prompt), "continue_final_message": continue_final}
    if body.tools:
        kwargs["tools"] = template_tools(body)
    try:
        # transformers renders chat templates in an ImmutableSandboxedEnvironment (no attribute access to
        # internals, no mutation); the template comes from the model directory, never from the request.
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as exc:  # template errors (e.g. raise_exception for bad role order) are the client's
        raise InvalidRequestError(f"The messages could not be rendered with the model's chat template: {exc}",
                                  param="messages") from None
    specials = _special_texts(tok)
    # Tool definitions and calls are rendered by the template too, and are not isolated like contents:
    # special-token text there would become real control tokens (a forged turn boundary).
    for param, value in [("tools", kwargs.get("tools")),
                         *((f"messages[{i}]", {k: v for k, v in m.items() if k not in ("role", "content")})
                           for i, m in enumerate(messages))]:
        dumped = json.dumps(value, ensure_ascii=False) if value else ""
        if any(sp in dumped for sp in specials):
            raise InvalidRequestError("Tool definitions, tool calls and tool_call_id must not contain special-"
                                      "token text (e.g. an end-of-turn marker).", param=param)
    if not any(sp in m["content"] for m in messages for sp in specials):
        return tok.encode(text, add_special_tokens=False)
    ids = _encode_isolating_content(tok, text, messages, kwargs)
    if ids is None:
        raise InvalidRequestError("A message contains special-token text (e.g. an end-of-turn marker) in a place "
                                  "this model's chat template does not let Lanner isolate; remove it.",
                                  param="messages")
    return ids


def _special_texts(tok) -> list[str]:
    found = set(getattr(tok, "all_special_tokens", []))
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return [t for t in found if t]


_MARK = re.compile(r"\x00(\d+)\x00")


def _encode_isolating_content(tok, text: str, messages: list[dict], kwargs: dict) -> list[int] | None:
    """Token ids of the rendered chat where the template's own text may produce control tokens but message
    contents never do (their special-token text is tokenized as plain text).

    The template is rendered a second time with a marker in place of each content; the literal pieces between
    markers are then matched in the real rendering, so each content's span (as the template placed it,
    possibly trimmed) is known. Returns None if the rendering can't be aligned that way."""
    marked = [{**m, "content": f"\x00{i}\x00"} for i, m in enumerate(messages)]
    try:
        skeleton = tok.apply_chat_template(marked, tokenize=False, **kwargs)
    except Exception:
        return None
    parts = _MARK.split(skeleton)  # literal, index, literal, index, ..., literal
    ids: list[int] = []
    pos = 0
    for k in range(0, len(parts), 2):
        literal = parts[k]
        if not text.startswith(literal, pos):
            return None
        ids += tok.encode(literal, add_special_tokens=False) if literal else []
        pos += len(literal)
        if k + 1 == len(parts):
            break
        content = messages[int(parts[k + 1])]["content"]
        following = parts[k + 2]
        for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(following, end):
                ids += tok.encode(cand, add_special_tokens=False, split_special_tokens=True) if cand else []
                pos = end
                break
        else:
            return None
    return ids if pos == len(text) else None


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, registry: RegistryDep, settings: SettingsDep):
    deadlines = Deadlines.start(settings.queue_timeout, settings.request_timeout)
    handle = get_model(registry, body.model)
    check_sampling_token_ids(handle, body)
    prompt = await run_in_threadpool(render_chat, handle, body)
    params = body.to_sampling_params(resolve_max_tokens(handle, len(prompt), body.requested_max_tokens, "messages"))
    try:
        tools = ToolPlan.of(body)
    except GrammarError as exc:
        raise InvalidRequestError(f"A function's parameters: {exc}", param="tools") from None
    if tools is not None:
        params = dataclasses.replace(params, grammar=tools.grammar)
    check_grammar_support(handle, params, "tools" if tools is not None else "response_format")
    prompts = [prompt]
    jobs = make_jobs(prompts, [params], body.n or 1)
    req = admit(handle, jobs, deadlines)
    response_id, created = new_id("chatcmpl"), now()
    fingerprint = f"lanner-{__version__}"
    if body.stream:
        return sse_response(stream_choices(
            "chat", req, prompts, response_id=response_id, created=created,
            model=body.model, include_usage=body.include_usage, fingerprint=fingerprint,
            logprobs=bool(body.logprobs), tools=tools))
    results = await collect_jobs(req)
    strings = token_strings(handle.tokenizer)
    choices = []
    for r in results:
        message, finish = AssistantMessage(content=r.text), r.finish_reason
        calls = tools.calls(r.text) if tools is not None and (finish == "stop" or tools.mode == "named") else None
        if calls is not None:
            message, finish = AssistantMessage(content=None, tool_calls=calls), tools.finish_reason
            if r.finish_reason == "length":  # a named call's arguments cut short, as OpenAI returns them
                finish = "length"
        choices.append(ChatChoice(index=r.index, message=message, finish_reason=finish,
                                  logprobs={"content": chat_logprobs(strings, r.logprobs or [])} if body.logprobs
                                  else None))
    return ChatCompletionResponse(
        id=response_id, created=created, model=body.model, system_fingerprint=fingerprint,
        choices=choices, usage=usage(prompts, sum(r.num_output_tokens for r in results),
                    {r.index: r.num_cached_tokens for r in results}),
    )
