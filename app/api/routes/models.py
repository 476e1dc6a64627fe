"""GET /v1/models: the served model id and the aliases a client may send."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.context import Context
from app.errors import ModelNotFound

router = APIRouter(prefix="/v1", tags=["models"])


def _model(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "voxtral-server"}


@router.get("/models")
async def list_models(ctx: Context) -> dict[str, Any]:
    ids, created, primary = ctx.serving.model_ids, ctx.created, ctx.settings.model_id
    ordered = [primary, *sorted(i for i in ids if i != primary)]
    return {"object": "list", "data": [_model(i, created) for i in ordered]}


@router.get("/models/{model_id:path}")
async def get_model(ctx: Context, model_id: str) -> dict[str, Any]:
    if model_id not in ctx.serving.model_ids:
        raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
    return _model(model_id, ctx.created)
