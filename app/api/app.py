"""`create_app(settings)`: wire the model, the engine and the routes into one FastAPI app.

The model can be passed in already loaded (tests share one load across many apps); otherwise
it is loaded at start-up. `/ready` turns true only after a warm-up generation, and false
again as soon as a drain starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import Lifespan

from app.api import errors, openapi
from app.api.auth import ApiKeyAuth, load_api_keys, warn_if_open
from app.api.lifecycle import DrainGuard, Lifecycle
from app.api.middleware import BodyLimits, RequestContext, Route
from app.api.realtime import route as realtime
from app.api.routes import audio, chat, health, models, playground
from app.config import Settings
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.runner import Wrap, as_is
from app.metrics import Metrics
from app.model.loader import LoadedModel, load_model
from app.model.runtime import ModelRuntime
from app.serving.realtime.service import RealtimeServing
from app.serving.service import Serving

log = logging.getLogger(__name__)


async def build_serving(
    settings: Settings, model: LoadedModel, metrics: Metrics, wrap_generator: Wrap = as_is
) -> Serving:
    """The model facade (a pass over the vocabulary: off the loop), the engine on it, the serving layer."""
    runtime = await asyncio.to_thread(ModelRuntime.of, model, settings.model_id)
    return Serving(settings, build_engine(settings, runtime, metrics, wrap_generator), runtime)


def build_engine(settings: Settings, runtime: ModelRuntime, metrics: Metrics, wrap_generator: Wrap = as_is) -> Engine:
    return Engine(
        wrap_generator(runtime.generator),
        EngineConfig.from_settings(settings),
        eos_token_ids={runtime.eos_id},
        decode=runtime.text,
        metrics=metrics,
    )


def create_app(
    settings: Settings,
    loaded: LoadedModel | None = None,
    metrics: Metrics | None = None,
    wrap_generator: Wrap = as_is,
) -> FastAPI:
    """`wrap_generator`: what the engine calls instead of the model's generator (tests wrap it to inject faults)."""
    metrics = metrics or Metrics()
    lifecycle = Lifecycle()
    app = FastAPI(
        title="voxtral-server", version="0.1.0", lifespan=make_lifespan(settings, loaded, metrics, wrap_generator)
    )
    app.state.settings, app.state.metrics, app.state.lifecycle = settings, metrics, lifecycle
    app.state.created = int(time.time())
    errors.install(app)
    openapi.install(app)
    routers = (audio.router, chat.router, models.router, health.router)
    for router in routers:
        app.include_router(router)
    app.include_router(realtime.router)
    if settings.playground:
        playground.install(app)
    routes = [(r.path_regex, r.path_format) for router in routers for r in router.routes if isinstance(r, APIRoute)]
    install_middleware(app, settings, metrics, lifecycle, routes)
    return app


def make_lifespan(
    settings: Settings, loaded: LoadedModel | None, metrics: Metrics, wrap_generator: Wrap = as_is
) -> Lifespan[FastAPI]:
    """Load (unless given), start the engine, warm up, then ready; on exit stop the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle: Lifecycle = app.state.lifecycle
        model = loaded if loaded is not None else await asyncio.to_thread(load_model, settings)
        metrics.model_load_seconds.set(model.load_seconds)
        _warn_if_random(model)
        serving = await build_serving(settings, model, metrics, wrap_generator)
        engine = serving.engine
        app.state.serving, app.state.engine = serving, engine
        app.state.realtime = RealtimeServing(serving.prep, serving.transcriptions, settings, metrics)
        engine.start()
        await serving.warm_up()
        lifecycle.ready = True
        try:
            yield
        finally:
            lifecycle.ready, lifecycle.draining = False, True
            engine.stop()
            serving.close()

    return lifespan


def _warn_if_random(model: LoadedModel) -> None:
    if model.random_weights:
        log.warning(
            "Serving the built-in TINY model from %s with RANDOM weights: its output is noise (demo/tests only). "
            "Use --model mistralai/Voxtral-Mini-3B-2507 for real transcription.",
            model.path,
        )


def install_middleware(
    app: FastAPI, settings: Settings, metrics: Metrics, lifecycle: Lifecycle, routes: list[Route]
) -> None:
    """Outermost first: log/metrics see every answer, auth runs before draining and body checks."""
    keys = load_api_keys(settings)
    warn_if_open(settings, keys)
    body_limit = settings.max_upload_bytes * 4 // 3 + 1024 * 1024  # base64 in JSON is 4/3 the file
    app.add_middleware(BodyLimits, max_bytes=body_limit, timeout_s=settings.body_read_timeout_s)
    app.add_middleware(DrainGuard, lifecycle=lifecycle)
    app.add_middleware(ApiKeyAuth, keys=keys, protect_metrics=settings.metrics_require_key)
    app.add_middleware(RequestContext, metrics=metrics, routes=routes, log_prompts=settings.log_prompts)


async def drain(app: FastAPI) -> bool:
    """Start of shutdown (SIGTERM): /ready turns 503, new /v1 requests 503, accepted ones finish."""
    lifecycle: Lifecycle = app.state.lifecycle
    engine: Engine | None = getattr(app.state, "engine", None)
    return await lifecycle.drain(engine, app.state.settings.drain_timeout_s)
