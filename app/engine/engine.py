"""The engine's small interface to the serving layer: admission, submit (which returns a `Ticket`: result or
events, cancel, stats), drain, and what it holds (`waiting`, `running`, `idle`, and `stats()` with vLLM's meanings).

Callers see only this and the ticket; the queue, the work items, the scheduler and the worker thread stay
private behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from app.engine.config import EngineConfig
from app.engine.fatal import DEVICE_FAILED
from app.engine.item import WorkItem
from app.engine.queue import RequestQueue
from app.engine.runner import ModelRunner
from app.engine.stats import SchedulerStats
from app.engine.ticket import Ticket
from app.engine.worker import ModelWorker
from app.errors import DeviceFailed, QueueFull, RateLimited, ShuttingDown
from app.metrics import Metrics
from app.refusals import Refusals
from app.types import GenerationResult, PreparedRequest


@dataclass
class Reservation:
    """A queue place that `Engine.admission()` holds while a request is prepared; the first submit
    given it takes the place over, so the prepared request cannot be refused for want of room."""

    owner: str = ""
    held: bool = True


class Engine:
    def __init__(
        self,
        generator: ModelRunner,
        config: EngineConfig,
        *,
        eos_token_ids: set[int],
        decode: Callable[[list[int]], str],
        metrics: Metrics,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """`on_fatal(reason)`: called once, from the worker thread, when the device fails beyond repair
        (app/engine/fatal.py); every request is then answered 503 and the engine takes no more."""
        self.config = config
        self._metrics = metrics
        self._wake: Callable[[], object] | None = None
        """Set while `drain` waits: wakes it from the worker thread or a queue change."""
        self._refusals = Refusals(metrics)
        self._queue = RequestQueue(
            config.max_queue, on_change=self._queue_changed, max_per_owner=config.max_queued_per_owner
        )
        self._worker = ModelWorker(
            generator,
            self._queue,
            config,
            eos_token_ids=eos_token_ids,
            decode=decode,
            metrics=metrics,
            on_tick=self._changed,
            on_fatal=on_fatal,
        )
        self._accepting = False

    def start(self) -> None:
        self._worker.start()
        self._accepting = True

    @contextlib.contextmanager
    def admission(self, owner: str = "") -> Iterator[Reservation]:
        """Hold a queue place while a request is prepared: a full queue, or an `owner` (an opaque client key)
        past its share, is a 429 before any decoding. Pass the reservation to the submit; a place no submit
        took over is given back on exit."""
        self._check_alive()
        if not self._accepting:
            raise ShuttingDown("The server is shutting down and takes no new requests.")
        with self._noting_refusal(owner):
            self._queue.reserve(owner)
        reservation = Reservation(owner)
        try:
            yield reservation
        finally:
            if reservation.held:
                self._queue.release(owner)

    def submit(
        self, request: PreparedRequest, *, stream: bool = False, reservation: Reservation | None = None, owner: str = ""
    ) -> Ticket:
        """Enqueue at once or raise QueueFull / RateLimited / ShuttingDown; never blocks. `stream`: the ticket's
        `events()` carries tokens as they decode (otherwise only its `result()` is awaited)."""
        return self.submit_many([request], stream=stream, reservation=reservation, owner=owner)[0]

    def submit_many(
        self,
        requests: list[PreparedRequest],
        *,
        stream: bool = False,
        reservation: Reservation | None = None,
        owner: str = "",
    ) -> list[Ticket]:
        """Enqueue all or none (one queue lock), so related requests can share their first prefill.
        Without a reservation (or with one already taken over) the requests need places of their own.
        `owner`: whose requests they are (a reservation's owner wins): fair order and per-owner cap."""
        self._check_alive()
        if not self._accepting:
            raise ShuttingDown("The server is shutting down and takes no new requests.")
        owner = reservation.owner if reservation is not None else owner
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.config.request_timeout_s
        items = [
            WorkItem(request=r, loop=loop, deadline=deadline, stream=stream, owner=owner, on_cancel=self._queue.discard)
            for r in requests
        ]
        with self._noting_refusal(owner):
            self._queue.put_many(items, reserved=reservation is not None and reservation.held)
        if reservation is not None:  # only once enqueued: a refused submit leaves the place to admission
            reservation.held = False
        return [Ticket(item, self.config.request_timeout_s) for item in items]

    @contextlib.contextmanager
    def _noting_refusal(self, owner: str) -> Iterator[None]:
        """A full queue or an owner past its share is counted and logged (rate-limited), then raised."""
        try:
            yield
        except QueueFull as exc:
            self._refusals.note("client_queued" if isinstance(exc, RateLimited) else "queue_full", owner, exc.message)
            raise

    async def generate(self, request: PreparedRequest) -> GenerationResult:
        """Submit and wait: one request's whole answer (the warm-up's)."""
        return await self.submit(request).result()

    def ticket(self, key: int) -> Ticket | None:
        """The ticket of the request whose model rows carry `key`, while the worker holds them; None
        otherwise. For code that sees only rows (a wrapped `ModelRunner`, as tests inject faults)."""
        item = self._worker.item(key)
        return Ticket(item, self.config.request_timeout_s) if item is not None else None

    @property
    def dead(self) -> str | None:
        """Why the device failed beyond repair, once it has (then every request is refused 503)."""
        return self._worker.dead

    def _check_alive(self) -> None:
        if self._worker.dead is not None:
            raise DeviceFailed(DEVICE_FAILED)

    @property
    def waiting(self) -> int:
        """Requests queued, not yet taken by the worker."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Rows in the batch being decoded."""
        return self._worker.running

    def stats(self) -> SchedulerStats:
        """What the engine holds now, with vLLM's meanings (app/engine/stats.py); any thread may ask. Each
        count is read once, as the worker left it: a scrape in the middle of a merge may count a row twice."""
        worker, slots = self._worker, self.config.kv_cache_slots
        return SchedulerStats(
            num_running_reqs=worker.running + worker.prefilling,
            num_waiting_reqs=self.waiting + worker.parked,
            kv_cache_usage=min(1.0, worker.slots_used / slots) if slots else 0.0,
        )

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing the worker still owes an answer (running, prefilling or parked)."""
        return self.waiting == 0 and self._worker.held == 0

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests; wait until everything accepted is answered. True if it all finished.
        Woken by the worker after each turn of its loop and by the queue, not by polling. The engine's
        part of a drain: HTTP's part (`Lifecycle.drain`) waits first (docs/ARCHITECTURE.md)."""
        self._accepting = False
        loop, changed = asyncio.get_running_loop(), asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(changed.set)
        try:
            async with asyncio.timeout(timeout_s):
                while not self.idle:
                    changed.clear()
                    if not self.idle:  # cleared before the check: a change in between is not missed
                        await changed.wait()
        except TimeoutError:
            pass
        finally:
            self._wake = None
        return self.idle

    def _queue_changed(self, depth: int) -> None:
        self._metrics.waiting.set(depth)
        self._changed()

    def _changed(self) -> None:
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                wake()

    def stop(self) -> None:
        self._accepting = False
        self._queue.close()
        self._worker.stop()
        with contextlib.suppress(Exception):
            self._worker.fail_all(ShuttingDown("The server shut down before this request ran."))
