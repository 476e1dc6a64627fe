"""Probes and metrics, all answering from the moment the server listens: /health (the process is alive:
200 while loading, ready or draining), /ready (model loaded, warmed, not draining), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.context import Started

router = APIRouter(tags=["health"])


_STATUS = {"application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string"}}}}}


@router.get(
    "/health", responses={503: {"description": "Start-up or the device failed; the process exits", "content": _STATUS}}
)
async def health(state: Started) -> JSONResponse:
    """200 while the process can serve or is on its way to (`loading`, `ready`, `draining`): a liveness
    probe. 503 `failed` once start-up has failed, or the device has while serving, as the process exits."""
    status = state.lifecycle.status
    return JSONResponse({"status": status}, status_code=503 if status == "failed" else 200)


@router.get("/ready", responses={503: {"description": "Loading, warming up or draining", "content": _STATUS}})
async def ready(state: Started) -> JSONResponse:
    """200 only when loaded, warmed up and not draining: a load balancer sends traffic on 200 alone.
    Otherwise 503 with the `reason` (loading the model, warming up, shutting down, start-up failed, the
    device failed)."""
    lifecycle = state.lifecycle
    body: dict[str, str] = {"status": lifecycle.status, "model": state.settings.model_id}
    if (reason := lifecycle.reason) is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if lifecycle.serving else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: Started) -> Response:
    """Prometheus text exposition format."""
    instruments = state.metrics
    instruments.sample_gpu_memory()
    return Response(generate_latest(instruments.registry), media_type=CONTENT_TYPE_LATEST)
