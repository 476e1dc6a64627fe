"""The composition root: settings -> model -> engine -> serving layer -> one `AppContext` -> the FastAPI app.

`Wiring` builds the app at once and everything its routes use in the lifespan: the model (unless given
already loaded: tests share one load across many apps), the model facade, the engine, the serving layer
and the realtime sessions' shared resources, into one frozen `AppContext` yielded as the lifespan's state.
`/ready` turns true only after a warm-up generation, and false again as soon as a drain starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.app import build_api
from app.api.context import STATE_KEY, AppContext
from app.api.lifecycle import Lifecycle
from app.config import Settings
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.runner import Wrap, as_is
from app.metrics import Metrics
from app.model.compute.loader import LoadedModel, load_model
from app.model.runtime import ModelRuntime
from app.serving.realtime.service import RealtimeServing
from app.serving.service import Serving

log = logging.getLogger(__name__)


class Wiring:
    """One server: its FastAPI `app` and, from the start of its lifespan, the `context` its routes get.

    `wrap_generator`: what the engine calls instead of the model's generator (tests wrap it to inject faults).
    """

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel | None = None,
        metrics: Metrics | None = None,
        wrap_generator: Wrap = as_is,
    ) -> None:
        self.settings, self.loaded, self.wrap_generator = settings, loaded, wrap_generator
        self.metrics = metrics or Metrics()
        self.lifecycle = Lifecycle()
        self.created = int(time.time())
        self.context: AppContext | None = None
        """Set once by the lifespan, before the engine starts (a drain may come during the warm-up)."""
        self.engine: Engine | None = None
        """The engine under the context's serving layer, built with it."""
        self.app = build_api(settings, self.metrics, self.lifecycle, self.lifespan)

    async def build_context(self) -> AppContext:
        """Load (unless given), then the model facade (a pass over the vocabulary: off the loop), the
        engine on it (not started), the serving layer and the realtime sessions' shared resources."""
        model = self.loaded if self.loaded is not None else await asyncio.to_thread(load_model, self.settings)
        self.metrics.model_load_seconds.set(model.load_seconds)
        _warn_if_random(model)
        runtime = await asyncio.to_thread(ModelRuntime.of, model, self.settings.model_id)
        self.engine = self._engine(runtime)
        serving = Serving(self.settings, self.engine, runtime)
        realtime = RealtimeServing(serving.prep, serving.transcriptions, self.settings, self.metrics)
        return AppContext(self.settings, self.metrics, self.lifecycle, serving, realtime, self.created)

    def _engine(self, runtime: ModelRuntime) -> Engine:
        return Engine(
            self.wrap_generator(runtime.generator),
            EngineConfig.from_settings(self.settings),
            eos_token_ids={runtime.eos_id},
            decode=runtime.text,
            metrics=self.metrics,
        )

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[dict[str, AppContext]]:
        """Build the context, start the engine, warm up, then ready; on exit stop the engine."""
        ctx = self.context = await self.build_context()
        engine = self.engine
        assert engine is not None  # built with the context
        engine.start()
        await ctx.serving.warm_up()
        self.lifecycle.ready = True
        try:
            yield {STATE_KEY: ctx}
        finally:
            self.lifecycle.ready, self.lifecycle.draining = False, True
            engine.stop()
            ctx.serving.close()

    async def drain(self) -> bool:
        """Start of shutdown (SIGTERM): /ready turns 503, new /v1 requests 503, accepted ones finish."""
        return await self.lifecycle.drain(self.engine, self.settings.drain_timeout_s)


def create_app(
    settings: Settings,
    loaded: LoadedModel | None = None,
    metrics: Metrics | None = None,
    wrap_generator: Wrap = as_is,
) -> FastAPI:
    """The app alone, for callers that never drain it nor read its context (see `Wiring`)."""
    return Wiring(settings, loaded, metrics, wrap_generator).app


def _warn_if_random(model: LoadedModel) -> None:
    if model.random_weights:
        log.warning(
            "Serving the built-in TINY model from %s with RANDOM weights: its output is noise (demo/tests only). "
            "Use --model mistralai/Voxtral-Mini-3B-2507 for real transcription.",
            model.path,
        )
