"""POST /v1/completions"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.api.deps import RegistryDep, SettingsDep
from app.api.errors import InvalidRequestError
from app.api.logprobs import completion_logprobs, completion_piece, token_strings
from app.api.serving import (
    Deadlines,
    admit,
    check_grammar_support,
    check_sampling_token_ids,
    check_token_ids,
    collect_jobs,
    get_model,
    make_jobs,
    resolve_max_tokens,
    usage,
)
from app.api.streaming import sse_response, stream_choices
from app.engine.registry import ModelHandle
from app.protocol.openai import CompletionChoice, CompletionRequest, CompletionResponse, new_id, now

router = APIRouter()


def tokenize_prompt(handle: ModelHandle, prompt: str | list) -> list[list[int]]:
    """Prompt as a string, list of strings, token ids, or list of token-id lists -> token-id lists."""
    tok = handle.tokenizer
    if isinstance(prompt, str):
        return [tok.encode(prompt, add_special_tokens=True)]
    if all(isinstance(p, str) for p in prompt):
        return [tok.encode(p, add_special_tokens=True) for p in prompt]
    lists = prompt if isinstance(prompt[0], list) else [prompt]
    for ids in lists:
        check_token_ids(handle, ids, "prompt")
    return [list(ids) for ids in lists]


@router.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=False)
async def create_completion(body: CompletionRequest, registry: RegistryDep, settings: SettingsDep):
    deadlines = Deadlines.start(settings.queue_timeout, settings.request_timeout)
    handle = get_model(registry, body.model)
    check_sampling_token_ids(handle, body)
    prompts = await run_in_threadpool(tokenize_prompt, handle, body.prompt)
    if len(prompts) * (body.n or 1) > 64:
        raise InvalidRequestError("At most 64 choices (prompts x n) per request.", param="prompt")
    params = [body.to_sampling_params(resolve_max_tokens(handle, len(p), body.max_tokens, "prompt"))
              for p in prompts]
    check_grammar_support(handle, params[0], "response_format")
    jobs = make_jobs(prompts, params, body.n or 1)
    req = admit(handle, jobs, deadlines)
    response_id, created = new_id("cmpl"), now()
    fingerprint = f"lanner-{__version__}"
    echo = await run_in_threadpool(echo_texts, handle, body.prompt, prompts) if body.echo else None
    with_logprobs = body.logprobs is not None
    if body.stream:
        return sse_response(stream_choices(
            "completion", req, prompts, response_id=response_id, created=created,
            model=body.model, include_usage=body.include_usage, fingerprint=fingerprint,
            logprobs=with_logprobs, echo=echo))
    results = await collect_jobs(req)
    n = body.n or 1
    choices = []
    for r in results:
        text, entries = completion_piece(
            r.text, r.logprobs, echo=echo[r.index // n] if echo is not None else None,
            prompt_ids=prompts[r.index // n], prompt_logprobs=r.prompt_logprobs, with_logprobs=with_logprobs)
        lp_obj = completion_logprobs(token_strings(handle.tokenizer), entries, 0, text)[0] if with_logprobs else None
        choices.append(CompletionChoice(index=r.index, text=text, logprobs=lp_obj, finish_reason=r.finish_reason))
    return CompletionResponse(
        id=response_id, created=created, model=body.model, system_fingerprint=fingerprint, choices=choices,
        usage=usage(prompts, sum(r.num_output_tokens for r in results),
                    {r.index: r.num_cached_tokens for r in results}),
    )


def echo_texts(handle: ModelHandle, prompt: str | list, prompts: list[list[int]]) -> list[str]:
    """The text `echo` puts before each prompt's completions: the prompt as sent, or its token ids decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [handle.tokenizer.decode(ids) for ids in prompts]
