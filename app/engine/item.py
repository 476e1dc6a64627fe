"""A queued request: what to run, when it arrived, and the channel its answer goes back on.

The worker thread resolves it; the event loop awaits it. Pushes go through
`loop.call_soon_threadsafe` and are dropped once the item is finished, so a client that
went away can never make the worker fail. Private to the engine: callers hold a `Ticket`
(app/engine/ticket.py), and the model's rows carry only the item's `key`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from app.types import GenerationResult, PreparedRequest, TokenEvent

Event = TokenEvent | GenerationResult | BaseException


@dataclass(eq=False)
class WorkItem:
    request: PreparedRequest
    loop: asyncio.AbstractEventLoop
    deadline: float
    stream: bool = False
    owner: str = ""
    """Whose request it is (an opaque client key): the queue's per-owner cap and fair order count by it."""
    key: int = field(default_factory=itertools.count().__next__)
    """Unique in the process: the model rows of this request carry it (`Row.key`), never the item."""
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    result: GenerationResult | None = None
    choices: dict[int, GenerationResult] = field(default_factory=dict)
    """With n > 1: the results of the choices that have finished, by index (the worker's, until the last)."""
    on_cancel: Callable[[WorkItem], None] | None = None
    """Set by the engine: takes the item out of the queue if it is still there, so that an abandoned
    request gives its place back at once instead of when the worker next takes a batch."""
    _events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _finishing: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """The client went away or timed out: the worker drops the row before its next step. No-op
        once finished."""
        self._cancelled.set()
        if self.on_cancel is not None and not self.done:
            self.on_cancel(self)

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def push(self, event: TokenEvent) -> None:
        if self.stream and not self.done:
            self._send(event)

    def finish(self, outcome: GenerationResult | BaseException) -> None:
        """Resolve exactly once; later calls are ignored (also from another thread: at shutdown the
        event loop answers what a worker that did not stop in time still holds)."""
        with self._finishing:
            if self.done:
                return
            self._done.set()
        self._send(outcome)

    def _send(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events until the end; raises the failure, if any. The result is in `result`."""
        while True:
            event = await self._events.get()
            if isinstance(event, BaseException):
                try:
                    raise event
                finally:  # its traceback holds this frame: a local naming it would keep both (and the
                    del event  # request's audio) in a cycle until the collector's next full pass
            if isinstance(event, GenerationResult):
                self.result = event
                return
            yield event

    async def wait(self) -> GenerationResult:
        async for _ in self.events():
            pass
        assert self.result is not None
        return self.result
