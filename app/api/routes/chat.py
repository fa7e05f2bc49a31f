"""POST /v1/chat/completions: messages go through the model's own chat template."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.api.deps import RegistryDep
from app.api.errors import InvalidRequestError
from app.api.serving import check_token_ids, collect_jobs, get_model, make_jobs, resolve_max_tokens, usage
from app.api.streaming import sse_response, stream_choices
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
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    continue_final = not body.add_generation_prompt and messages[-1]["role"] == "assistant"
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=bool(body.add_generation_prompt),
                                       continue_final_message=continue_final)
    except Exception as exc:  # template errors (e.g. raise_exception for bad role order) are the client's
        raise InvalidRequestError(f"The messages could not be rendered with the model's chat template: {exc}",
                                  param="messages") from None
    return tok.encode(text, add_special_tokens=False)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, registry: RegistryDep):
    handle = get_model(registry, body.model)
    if body.stop_token_ids:
        check_token_ids(handle, body.stop_token_ids, "stop_token_ids")
    prompt = await run_in_threadpool(render_chat, handle, body)
    params = body.to_sampling_params(resolve_max_tokens(handle, len(prompt), body.requested_max_tokens, "messages"))
    prompts = [prompt]
    jobs = make_jobs(prompts, [params], body.n or 1)
    response_id, created = new_id("chatcmpl"), now()
    fingerprint = f"lanner-{__version__}"
    if body.stream:
        return sse_response(stream_choices(
            "chat", handle, jobs, prompts, response_id=response_id, created=created,
            model=body.model, include_usage=body.include_usage, fingerprint=fingerprint))
    results = await collect_jobs(handle, jobs)
    return ChatCompletionResponse(
        id=response_id, created=created, model=body.model, system_fingerprint=fingerprint,
        choices=[ChatChoice(index=r.index, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
                 for r in results],
        usage=usage(prompts, sum(r.num_output_tokens for r in results)),
    )
