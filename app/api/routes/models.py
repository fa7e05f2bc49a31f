"""GET /v1/models, GET /v1/models/{id}"""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import RegistryDep
from app.api.errors import ModelNotFoundError
from app.protocol.openai import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[ModelCard(id=h.id, created=h.created, max_model_len=h.max_model_len)
                           for h in registry.handles.values()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model_card(model_id: str, registry: RegistryDep) -> ModelCard:
    h = registry.get(model_id)
    if h is None:
        raise ModelNotFoundError(model_id)
    return ModelCard(id=h.id, created=h.created, max_model_len=h.max_model_len)
