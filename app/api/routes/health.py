"""Probes and metrics: /health (process alive), /ready (model loaded, warmed, not draining), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.context import Context

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(ctx: Context) -> JSONResponse:
    """200 only when loaded, warmed up and not draining: a load balancer sends traffic on 200 alone."""
    lifecycle = ctx.lifecycle
    status = "draining" if lifecycle.draining else "ready" if lifecycle.ready else "not ready"
    body = {"status": status, "model": ctx.settings.model_id}
    return JSONResponse(body, status_code=200 if lifecycle.serving else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
async def metrics(ctx: Context) -> Response:
    """Prometheus text exposition format."""
    instruments = ctx.metrics
    instruments.sample_gpu_memory()
    return Response(generate_latest(instruments.registry), media_type=CONTENT_TYPE_LATEST)
