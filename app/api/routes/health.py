"""GET /health (liveness: the process answers) and GET /ready (every model loaded)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, registry: RegistryDep) -> JSONResponse:
    models = {h.id: h.state for h in registry.handles.values()}
    if request.app.state.drain.draining:  # SIGTERM: the load balancer should stop sending us requests
        return JSONResponse({"status": "draining", "models": models}, status_code=503)
    ok = registry.is_ready
    return JSONResponse({"status": "ready" if ok else "not_ready", "models": models},
                        status_code=200 if ok else 503)
