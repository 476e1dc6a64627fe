"""`create_app(settings)`: wire the model, the engine and the routes into one FastAPI app.

The model can be passed in already loaded (tests share one load across many apps); otherwise
it is loaded at start-up. `/ready` turns true only after a warm-up generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import errors
from app.api.middleware import BodySizeLimit, RequestContext
from app.api.routes import audio, chat, health, models
from app.api.service import Service
from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.model.generate import BatchGenerator
from app.model.loader import LoadedModel, load_model
from app.model.prompts import Prompter
from app.types import PreparedRequest, SamplingParams

log = logging.getLogger(__name__)


def build_engine(settings: Settings, loaded: LoadedModel, metrics: Metrics) -> tuple[Engine, Service]:
    tokenizer = loaded.processor.tokenizer
    special = tokenizer.tokenizer.instruct_tokenizer.tokenizer
    prompter = Prompter(loaded.processor, settings.model_id, loaded.model.config.audio_config.max_source_positions * 2)
    engine = Engine(
        BatchGenerator(loaded.model, pad_token_id=special.pad_id),
        eos_token_ids={special.eos_id},
        decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
        max_queue=settings.max_queue,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_wait_ms,
        request_timeout_s=settings.request_timeout_s,
        metrics=metrics,
    )
    return engine, Service(settings, engine, prompter, tokenizer)


async def warm_up(service: Service) -> None:
    """One tiny generation so the first real request pays no one-time cost."""
    encoded = service.prompter.chat([{"role": "user", "content": "Hi"}])
    request = PreparedRequest(encoded.input_ids, None, SamplingParams(max_new_tokens=2), "chat")
    await service.engine.generate(request)


def create_app(settings: Settings, loaded: LoadedModel | None = None, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = loaded if loaded is not None else await asyncio.to_thread(load_model, settings)
        metrics.model_load_seconds.set(model.load_seconds)
        if model.random_weights:
            log.warning("Serving the built-in TINY model with RANDOM weights: its output is noise (demo/tests only).")
        engine, service = build_engine(settings, model, metrics)
        app.state.service, app.state.engine = service, engine
        engine.start()
        await warm_up(service)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            engine.stop()
            service.close()

    app = FastAPI(title="voxtral-server", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.ready = settings, metrics, False
    app.state.created = int(time.time())
    errors.install(app)
    for router in (audio.router, chat.router, models.router, health.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes * 4 // 3 + 1024 * 1024)
    app.add_middleware(RequestContext, metrics=metrics)
    return app
