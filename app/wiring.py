"""The composition root: settings -> model -> engine -> serving layer -> one `AppContext` -> the FastAPI app.

`Wiring` builds the app at once. Its lifespan yields a `Startup` at once, so the server listens (and
/health, /ready, /metrics answer) while the rest is built in the background: the model (unless given
already loaded: tests share one load across many apps), the model facade, the engine, the serving layer
and the realtime sessions' shared resources, into one frozen `AppContext`. `/ready` turns true only after
a warm-up generation, and false again as soon as a drain starts. A start-up that fails marks the lifecycle
failed (the server watches it and exits), and so does a device that fails beyond repair while serving (the
engine's `on_fatal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.app import build_api
from app.api.context import STATE_KEY, AppContext, Startup
from app.api.lifecycle import Lifecycle
from app.config import Settings
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.runner import Wrap, as_is
from app.engine.stats import SchedulerStats
from app.metrics import Metrics
from app.model.compute.budget import plan_streams
from app.model.compute.loader import REALTIME_MODEL_TYPE, LoadedModel, ModelLoadError, load_model
from app.model.realtime.engine import RealtimeEngine
from app.model.realtime.pool import StreamPool
from app.model.runtime import ModelRuntime
from app.serving.realtime.service import RealtimeServing
from app.serving.realtime.streams import StreamLoop
from app.serving.response_store import ResponseStore, Retention
from app.serving.responses import ResponsesServing
from app.serving.service import Serving
from app.serving.streaming import StreamingServing

log = logging.getLogger(__name__)


class Wiring:
    """One server: its FastAPI `app` and, from the start of its lifespan, the `context` its routes get.

    `wrap_generator`: what the engine calls instead of the model's generator (tests wrap it to inject faults).
    `load`: how the model is loaded when none is given (tests slow it down to see each start-up state).
    """

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel | None = None,
        metrics: Metrics | None = None,
        wrap_generator: Wrap = as_is,
        load: Callable[[Settings], LoadedModel] = load_model,
    ) -> None:
        self.settings, self.loaded, self.wrap_generator, self.load = settings, loaded, wrap_generator, load
        self.metrics = metrics or Metrics()
        self.lifecycle = Lifecycle()
        self.created = int(time.time())
        self._born = time.monotonic()
        self.startup = Startup(settings, self.metrics, self.lifecycle)
        """What the lifespan yields at once; its `context` is set once start-up has built it."""
        self.engine: Engine | None = None
        """The engine under the context's serving layer, built with it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The server's event loop, once its lifespan has started (where `fail` sends the lifecycle's failure)."""
        self.runtime: ModelRuntime | None = None
        """The model facade under `engine` (its decode step's CUDA graphs are captured after the warm-up)."""
        self.streams: StreamLoop | None = None
        """A Voxtral Realtime model's ticking loop (instead of `engine`), built with the context."""
        self.app = build_api(settings, self.metrics, self.lifecycle, self.lifespan)
        self.metrics.watch_scheduler(self._scheduler_stats, settings.model_id)

    @property
    def context(self) -> AppContext | None:
        """Set once by the start-up, before the engine starts (a drain may come during the warm-up)."""
        return self.startup.context

    def _scheduler_stats(self) -> SchedulerStats | None:
        """The engine's counts for /metrics (a realtime model's: its loop's); None until start-up has built it."""
        if self.streams is not None:
            return self.streams.stats()
        return self.engine.stats() if self.engine is not None else None

    async def build_context(self) -> AppContext:
        """Load (unless given), then the model facade (a pass over the vocabulary: off the loop), the
        engine on it (not started), the serving layer and the realtime sessions' shared resources."""
        model = self.loaded if self.loaded is not None else await _in_daemon_thread(self.load, self.settings)
        self.metrics.model_load_seconds.set(model.load_seconds)
        _warn_if_random(model)
        if model.model.config.model_type == REALTIME_MODEL_TYPE:
            return await self._streaming_context(model)
        runtime = await asyncio.to_thread(ModelRuntime.of, model, self.settings)
        self.metrics.watch_encoder_cache(runtime.generator.encoder_cache.stats)
        self.metrics.watch_prefix_cache(runtime.generator.prefix_stats, self.settings.model_id)
        self.engine, self.runtime = self._engine(runtime), runtime
        serving = Serving(self.settings, self.engine, runtime)
        realtime = RealtimeServing(serving.prep, serving.transcriptions, self.settings, self.metrics)
        responses = ResponsesServing(serving.chats, await self._response_store())
        return AppContext(
            self.settings,
            self.metrics,
            self.lifecycle,
            serving,
            realtime,
            responses,
            self.created,
            model.random_weights,
        )

    async def _streaming_context(self, model: LoadedModel) -> AppContext:
        """A Voxtral Realtime model: its stream caches (allocated once, off the loop), the ticking loop's
        thread, and the serving layer over it (no engine: sessions and transcriptions stream)."""
        s = self.settings
        count = await asyncio.to_thread(_stream_count, model, s)
        engine = await asyncio.to_thread(RealtimeEngine, model.model, model.processor, count)
        interval = s.realtime_tick_interval_ms / 1000
        streams = self.streams = StreamLoop(engine, self.metrics, count, interval, self.fail)
        streams.start()
        serving = StreamingServing(s, streams)
        realtime = RealtimeServing(serving.prep, None, s, self.metrics, streams)
        responses = ResponsesServing(serving.chats, await self._response_store())
        args = (s, self.metrics, self.lifecycle, serving, realtime, responses, self.created, model.random_weights)
        return AppContext(*args)

    async def _response_store(self) -> ResponseStore:
        s = self.settings
        path = s.responses_db or s.cache_dir / "responses.sqlite3"
        retention = Retention(s.responses_max_age_h * 3600, s.responses_max_stored, int(s.responses_max_db_mb * 2**20))
        return await ResponseStore.open(path, retention)

    def _engine(self, runtime: ModelRuntime) -> Engine:
        """The engine's `on_fatal` (called from its worker thread) fails the lifecycle through `fail`."""

        def device_failed(reason: str) -> None:
            self.fail(f"the device failed: {reason}")

        return build_engine(self.settings, runtime, self.metrics, device_failed, self.wrap_generator)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[dict[str, Startup]]:
        """Yield the start-up state at once and start up in the background; on exit stop what started."""
        self._loop = asyncio.get_running_loop()
        starting = asyncio.create_task(self._start())
        try:
            yield {STATE_KEY: self.startup}
        finally:
            self.lifecycle.ready, self.lifecycle.draining = False, True
            starting.cancel()  # a load in its thread runs on; nothing waits for it
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if self.engine is not None:
                self.engine.stop()
            if self.context is not None:
                self.context.serving.close()
                self.context.responses.close()

    async def _start(self) -> None:
        """Load and build the context, start the engine, warm up, capture the decode step's CUDA graphs, then
        ready (unless a drain came first)."""
        lifecycle = self.lifecycle
        try:
            lifecycle.stage = "loading the model"
            ctx = self.startup.context = await self.build_context()
            lifecycle.stage = "warming up"
            if self.engine is not None:  # (a realtime model's loop started with its context)
                self.engine.start()
            await ctx.serving.warm_up()
            if self.runtime is not None:
                # The worker idles meanwhile: nothing is admitted before ready, and the warm-up was answered
                # after its last step.
                await asyncio.to_thread(self.runtime.generator.capture)
        except Exception as exc:
            lifecycle.fail(f"start-up failed: {str(exc) or type(exc).__name__}")
            log.error("%s", lifecycle.failed, exc_info=not isinstance(exc, ModelLoadError))
            return
        lifecycle.ready = not lifecycle.draining
        log.info("ready: %s in %.1f s", self.settings.model_id, time.monotonic() - self._born)

    def fail(self, reason: str) -> None:
        """The server can serve no more (callable from any thread): /ready turns 503 `failed` and the server
        exits. Before the lifespan starts nothing else touches the lifecycle; after, only its event loop does."""
        if self._loop is None:
            self.lifecycle.fail(reason)
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone already
            self._loop.call_soon_threadsafe(self.lifecycle.fail, reason)

    def failed(self) -> bool:
        """Start-up failed, or the device did while serving: the server should exit (non-zero)."""
        return self.lifecycle.failed is not None

    async def drain(self) -> bool:
        """Start of shutdown (SIGTERM): /ready turns 503, new /v1 requests 503, accepted ones finish."""
        return await self.lifecycle.drain(self.engine or self.streams, self.settings.drain_timeout_s)


def build_engine(
    settings: Settings,
    runtime: ModelRuntime,
    metrics: Metrics,
    on_fatal: Callable[[str], None] | None = None,
    wrap_generator: Wrap = as_is,
) -> Engine:
    """The engine over `runtime`'s generator with the server's limits (not started): the server's and
    `voxtral-server eval`'s one recipe."""
    return Engine(
        wrap_generator(runtime.generator),
        EngineConfig.from_settings(settings, max_rows=runtime.generator.max_rows),
        eos_token_ids={runtime.eos_id},
        decode=runtime.text,
        metrics=metrics,
        on_fatal=on_fatal,
    )


def create_app(
    settings: Settings,
    loaded: LoadedModel | None = None,
    metrics: Metrics | None = None,
    wrap_generator: Wrap = as_is,
) -> FastAPI:
    """The app alone, for callers that never drain it nor read its context (see `Wiring`)."""
    return Wiring(settings, loaded, metrics, wrap_generator).app


async def _in_daemon_thread(load: Callable[[Settings], LoadedModel], settings: Settings) -> LoadedModel:
    """`load(settings)` in a thread of its own that does not hold the process at exit: a SIGTERM during a
    minutes-long load ends the process at once (`asyncio.to_thread`'s pool is joined at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[LoadedModel] = loop.create_future()

    def settle(result: LoadedModel | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = load(settings), None
        except BaseException as exc:  # handed to the waiting task, which reports it
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return await done


def _stream_count(model: LoadedModel, settings: Settings) -> int:
    """--realtime-max-streams, or fewer when the KV budget holds fewer (one stream's caches measured on a pool of
    no stream but the scratch slot, freed before the budget is read)."""
    probe = StreamPool.allocate(model.model, 0)
    per_stream = probe.nbytes()
    del probe
    return plan_streams(model.model, settings, per_stream)


def _warn_if_random(model: LoadedModel) -> None:
    if model.random_weights:
        log.warning(
            "Serving the built-in TINY model from %s with RANDOM weights: its output is noise (demo/tests only). "
            "Use --model mistralai/Voxtral-Mini-3B-2507 for real transcription.",
            model.path,
        )
