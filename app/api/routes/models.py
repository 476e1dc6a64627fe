"""GET /v1/models: the served model id and the aliases a client may send."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.errors import ModelNotFound

router = APIRouter(prefix="/v1", tags=["models"])


def _model(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "voxtral-server"}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    ids = request.app.state.serving.model_ids
    created = request.app.state.created
    primary = request.app.state.settings.model_id
    ordered = [primary, *sorted(i for i in ids if i != primary)]
    return {"object": "list", "data": [_model(i, created) for i in ordered]}


@router.get("/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    if model_id not in request.app.state.serving.model_ids:
        raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
    return _model(model_id, request.app.state.created)
