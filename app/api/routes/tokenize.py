"""POST /tokenize, POST /detokenize (vLLM's extensions): the model's own tokenizer and chat template, as the
completion and chat endpoints apply them, so a client can count tokens before it sends a request."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import RegistryDep
from app.api.errors import invalid_request_from
from app.api.routes.chat import render_chat
from app.api.serving import check_token_ids, get_model
from app.protocol.openai import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, registry: RegistryDep) -> TokenizeResponse:
    handle = get_model(registry, body.model)
    if body.messages is not None:
        try:
            chat = body.as_chat()
        except ValidationError as exc:  # what the chat endpoint would refuse (e.g. two tools of one name)
            raise invalid_request_from(exc.errors()) from None
        ids = await run_in_threadpool(render_chat, handle, chat)
    else:
        ids = await run_in_threadpool(handle.tokenizer.encode, body.prompt,
                                      add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=handle.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, registry: RegistryDep) -> DetokenizeResponse:
    handle = get_model(registry, body.model)
    check_token_ids(handle, body.tokens, "tokens")
    return DetokenizeResponse(prompt=await run_in_threadpool(handle.tokenizer.decode, body.tokens))
