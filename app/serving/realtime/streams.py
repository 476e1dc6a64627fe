"""The Voxtral Realtime ticking loop: one worker thread owns the model layer's `RealtimeEngine` and steps every
stream that holds a new 80 ms frame in one tick; the event loop opens streams, feeds them and reads their tokens.

Event-loop side: `StreamLoop.open(delay)` gives a `Stream` at once (the delay and the stream limit are checked
here, so a refusal is an exception before anything is queued); `feed`, `flush` and `close` post commands, which
the worker applies in order, between ticks, so streams join and leave without the others noticing. `steps()`
yields the stream's `StreamStep`s as ticks emit them and ends after the final one (the flush's last token).

Worker side: sleep until a command comes; apply every waiting command; tick while any stream is due (applying
commands between ticks); hand each tick's steps to the event loop in one call. Ticks are coalesced: a tick
starts at least `tick_interval` after the previous one (commands applied while it waits), so streams that come
due within the interval share one forward; a token waits at most that long for it; a lagging stream (behind,
or flushed) ticks at once. The engine is touched by this
thread only (it is not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import numpy as np

from app.engine.fatal import DEVICE_FAILED, device_failure
from app.engine.stats import SchedulerStats
from app.errors import DeviceFailed, InternalError, InvalidRequest, RateLimited, ShuttingDown, VoxtralError
from app.metrics import Metrics
from app.model.realtime.engine import RealtimeEngine, StreamStep, TickResult
from app.model.realtime.timing import FRAME_MS, delay_tokens

log = logging.getLogger(__name__)
Delay = str | int | None
"""OpenAI's delay name (minimal..xhigh), milliseconds (80..2400, a multiple of 80), or None (the model's)."""


class Stream:
    """One utterance (or one HTTP file) being decoded. Touched only on the event loop."""

    def __init__(self, owner: StreamLoop, key: int) -> None:
        self._owner, self.key = owner, key
        self._out: asyncio.Queue[StreamStep | BaseException | None] = asyncio.Queue()  # None: closed
        self.closed = False

    def feed(self, samples: np.ndarray) -> None:
        """Float32 mono 16 kHz samples (never modified afterwards: the worker reads them later)."""
        if samples.size and not self.closed:
            self._owner.post("feed", self.key, samples)

    def flush(self) -> None:
        """End of the utterance: the model's right padding follows, and `steps()` ends after the final token."""
        if not self.closed:
            self._owner.post("flush", self.key)

    def close(self) -> None:
        """Free the stream's slot (idempotent): its remaining tokens are dropped, and `steps()` ends."""
        if not self.closed:
            self.closed = True
            self._out.put_nowait(None)
            self._owner.closed(self)

    async def steps(self) -> AsyncIterator[StreamStep]:
        """The tokens as ticks emit them, up to the final one (or the close). InternalError if the engine failed."""
        while True:
            step = await self._out.get()
            if step is None:
                return
            if isinstance(step, BaseException):
                raise step
            yield step
            if step.final:
                return

    def deliver(self, step: StreamStep | BaseException) -> None:
        if not self.closed:
            self._out.put_nowait(step)


Kind = Literal["open", "feed", "flush", "close"]


class StreamLoop:
    """The worker thread and its engine; `open` streams on the event loop that called `start`."""

    def __init__(
        self,
        engine: RealtimeEngine,
        metrics: Metrics,
        max_streams: int,
        tick_interval: float = 0.0,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """`on_fatal(reason)`: called once, from the worker thread, when the loop can tick no more (the device
        failed beyond repair, app/engine/fatal.py, or the loop itself broke): every open stream is then
        answered 503 `device_failed`, and the loop opens no more."""
        self.engine, self.metrics, self.max_streams = engine, metrics, max_streams
        self.on_fatal = on_fatal or (lambda reason: None)
        self._refusal: VoxtralError | None = None
        """Set once the loop takes no more streams (stopped or failed): what `open` and open streams get."""
        self.tick_interval = tick_interval
        self._last_tick = float("-inf")
        self.default_delay_ms = engine.default_delay_ms
        self._commands: deque[tuple[Kind, int, Any]] = deque()
        self._sids: dict[int, int] = {}  # worker side: key -> the engine's stream id
        self._streams: dict[int, Stream] = {}  # event-loop side: the open streams
        self._next = 0
        self._wake = threading.Event()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="voxtral-realtime", daemon=True)

    @property
    def live(self) -> int:
        return len(self._streams)

    def stats(self) -> SchedulerStats:
        """vLLM's scheduler gauges for a realtime deployment: every open stream runs (each tick steps every due
        one), none waits (a stream past the limit is refused), and the caches used are the streams' slots."""
        return SchedulerStats(self.live, 0, self.live / self.max_streams)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking (from any thread): every open stream is answered 503 `shutting_down`, and none opens."""
        self._end(ShuttingDown("The server is shutting down; retry the request on another replica."))

    async def drain(self, timeout_s: float) -> bool:
        """Take no new stream; True once every open stream has closed within `timeout_s`, else `stop` (the
        lifecycle's drain: `app.api.lifecycle.Drainable`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._refusal = self._refusal or ShuttingDown("The server is shutting down; retry on another replica.")
        while self.live and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.live:
            self.stop()
        return not self.live

    def _end(self, error: VoxtralError) -> None:
        """No more ticks: open streams get `error` (on the event loop), `open` refuses with it."""
        self._refusal = self._refusal if self._stopped else error  # a failure's refusal stays
        self._stopped = True
        self._wake.set()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads any more
                self._loop.call_soon_threadsafe(self._answer_open, error)

    def _answer_open(self, error: VoxtralError) -> None:
        for stream in list(self._streams.values()):
            stream.deliver(error)

    def check_delay(self, delay: Delay) -> int:
        """The delay's tokens, or InvalidRequest saying what is accepted."""
        try:
            return delay_tokens(delay, self.default_delay_ms)
        except ValueError as exc:
            raise InvalidRequest(f"Invalid delay: {exc}.", param="delay", code="invalid_value") from None

    def open(self, delay: Delay) -> tuple[Stream, int]:
        """A new stream and its delay in tokens; InvalidRequest for a bad delay, RateLimited when
        --realtime-max-streams are live."""
        tokens = self.check_delay(delay)
        if self._refusal is not None:
            raise self._refusal
        if self.live >= self.max_streams:
            raise RateLimited(
                f"This server decodes at most {self.max_streams} realtime streams at once; retry when one ends."
            )
        key, self._next = self._next, self._next + 1
        stream = self._streams[key] = Stream(self, key)
        self.metrics.realtime_streams.inc()
        self.post("open", key, tokens * FRAME_MS)  # checked: the engine gets plain milliseconds
        return stream, tokens

    def closed(self, stream: Stream) -> None:
        if self._streams.pop(stream.key, None) is not None:
            self.metrics.realtime_streams.dec()
            self.post("close", stream.key)

    def post(self, kind: Kind, key: int, payload: Any = None) -> None:
        self._commands.append((kind, key, payload))
        self._wake.set()

    # -- the worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        """The thread's body: whatever escapes the loop (a device failure, a bug) fails the server, never
        silently ends the thread."""
        try:
            self._serve()
        except BaseException as exc:
            reason = device_failure(exc)
            if reason is not None:
                log.critical("the realtime loop's device failed (%s): the server stops", reason)
                self._fatal(f"the device failed: {reason}", DeviceFailed(DEVICE_FAILED))
            else:
                log.exception("the realtime loop failed: the server stops")
                error = InternalError("The server's realtime loop failed and the server is restarting; retry.")
                self._fatal(f"the realtime loop failed: {type(exc).__name__}", error)

    def _fatal(self, reason: str, error: VoxtralError) -> None:
        self._refusal = error
        self.on_fatal(reason)  # first: the probes turn unhealthy no later than the first error leaves
        self._end(error)

    def _serve(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            self._apply()
            while self.engine.ready() and not self._stopped:
                self._coalesce()
                if self.engine.ready():  # the due streams may have closed meanwhile
                    self._tick()
                self._apply()  # streams join and leave between ticks

    def _coalesce(self) -> None:
        """Wait until `tick_interval` after the last tick's start, applying commands as they come, so streams
        that come due meanwhile join the tick; not while a stream lags."""
        while not self._stopped and not self.engine.lagging():
            left = self._last_tick + self.tick_interval - time.perf_counter()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()
            self._apply()

    def _apply(self) -> None:
        while self._commands:
            kind, key, payload = self._commands.popleft()
            try:
                self._do(kind, key, payload)
            except Exception as exc:  # a bug: that stream fails, the others go on
                log.exception("realtime stream %d: %s failed", key, kind)
                self._hand([(key, InternalError(f"The realtime stream failed: {type(exc).__name__}."))])

    def _do(self, kind: Kind, key: int, payload: Any) -> None:
        if kind == "open":
            self._sids[key] = self.engine.open(payload)
            return
        sid = self._sids.get(key)
        if sid is None:  # failed earlier
            return
        if kind == "feed":
            self.engine.feed(sid, payload)
        elif kind == "flush":
            self.engine.flush(sid)
        else:
            del self._sids[key]
            self.engine.close(sid)

    def _tick(self) -> None:
        started = self._last_tick = time.perf_counter()
        try:
            result = self.engine.tick()
        except Exception as exc:
            if device_failure(exc) is not None:
                raise  # the device is unusable: no later tick can succeed (`_run`)
            log.exception("realtime tick failed: every stream in it fails")
            error = InternalError(f"The realtime model failed: {type(exc).__name__}.")
            self._hand([(key, error) for key in list(self._sids)])
            self._close_all()
            return
        self._observe(result, time.perf_counter() - started)
        keys = {sid: key for key, sid in self._sids.items()}
        self._hand([(keys[step.stream], step) for step in result.steps if step.stream in keys])

    def _close_all(self) -> None:
        for sid in self._sids.values():
            self.engine.close(sid)
        self._sids.clear()

    def _observe(self, result: TickResult, seconds: float) -> None:
        self.metrics.realtime_tick_rows.observe(result.rows)
        self.metrics.realtime_tick_seconds.observe(seconds)
        self.metrics.realtime_tick_rtf.observe(seconds / (FRAME_MS / 1000))

    def _hand(self, steps: list[tuple[int, StreamStep | BaseException]]) -> None:
        if steps and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads any more
                self._loop.call_soon_threadsafe(self._deliver, steps)

    def _deliver(self, steps: list[tuple[int, StreamStep | BaseException]]) -> None:
        for key, step in steps:
            if (stream := self._streams.get(key)) is not None:
                stream.deliver(step)
