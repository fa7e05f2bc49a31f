"""GET /health (liveness: the process answers) and GET /ready (every model loaded)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(registry: RegistryDep) -> JSONResponse:
    models = {h.id: h.state for h in registry.handles.values()}
    ok = registry.is_ready
    return JSONResponse({"status": "ready" if ok else "not_ready", "models": models},
                        status_code=200 if ok else 503)
