"""The handle `Engine.submit` returns: all a caller sees of one queued request.

Await its `result()` or iterate its `events()` (once, one or the other), `cancel()` it, read its
`stats()`. Both ways of waiting end at the request's deadline with `RequestTimeout`, and cancel the
request however they end, so a caller that stops listening (client gone, an error, a timeout) never
leaves rows decoding for nobody. The work item behind it stays private to the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.engine.item import WorkItem
from app.errors import RequestTimeout
from app.types import GenerationResult, TokenEvent

_GRACE_S = 0.5
"""Waiters give up a little after the deadline: the worker answers an expired request itself first."""


@dataclass(frozen=True)
class TicketStats:
    """What one request cost so far, taken when asked (for the access log and --log-prompts).

    Until its result has reached the caller, a request counts no completion and no run time; if it
    started, it counts its wait in the queue."""

    prompt_tokens: int
    completion_tokens: int
    """The result's tokens (with `n` > 1, choice 0's), once the result reached the caller."""
    queue_s: float
    run_s: float
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...] | None
    """None until the result reached the caller."""


class Ticket:
    """One queued request, as its caller sees it (made by `Engine.submit`; wraps the engine's work item)."""

    def __init__(self, item: WorkItem, timeout_s: float) -> None:
        self._item, self._timeout_s = item, timeout_s

    @property
    def cancelled(self) -> bool:
        return self._item.cancelled

    @property
    def final(self) -> GenerationResult | None:
        """The result once `result()` or `events()` has received it; None before, or if it failed."""
        return self._item.result

    async def result(self) -> GenerationResult:
        """The whole answer; raises its failure, or `RequestTimeout` past the deadline. Cancels on exit."""
        try:
            return await asyncio.wait_for(self._item.wait(), timeout=self._remaining())
        except TimeoutError:
            raise self._timeout() from None
        finally:
            self._item.cancel()  # no-op when finished; stops the row if the caller went away

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events as they decode (submitted with `stream=True`), then `final` holds the result.
        Raises the failure, or `RequestTimeout` past the deadline. Cancels on exit."""
        try:
            async with asyncio.timeout(self._remaining()):
                async for event in self._item.events():
                    yield event
        except TimeoutError:
            raise self._timeout() from None
        finally:
            self._item.cancel()

    def cancel(self) -> None:
        """The caller no longer wants it: it leaves the queue at once, or its rows before the next
        step. Any thread; a no-op once it has finished."""
        self._item.cancel()

    def stats(self) -> TicketStats:
        """A frozen copy of what the request cost so far (see `TicketStats`); any time, any number of times."""
        item, result = self._item, self._item.result
        prompt = tuple(item.request.input_ids)
        if result is not None:
            output = tuple(result.token_ids)
            return TicketStats(len(prompt), len(output), result.queue_time_s, result.run_time_s, prompt, output)
        queued = item.started_at - item.enqueued_at if item.started_at is not None else 0.0
        return TicketStats(len(prompt), 0, queued, 0.0, prompt, None)

    def _remaining(self) -> float:
        return max(0.0, self._item.deadline - time.monotonic()) + _GRACE_S

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"The request did not finish within {self._timeout_s:g} s.")
