"""The queue and the work item, driven directly with plain inputs: no model, no worker thread, no HTTP.

The queue refuses at once when full (reserved places count), takes all of a group or none, gives an
abandoned item's place back at once, and answers dead items instead of handing them to the worker. A work
item resolves exactly once, from any thread, and never fails its resolver when its loop is gone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from app.engine.item import WorkItem
from app.engine.queue import RequestQueue
from app.engine.scheduler import Take
from app.engine.ticket import Ticket, TicketStats
from app.errors import QueueFull, RequestTimeout, ShuttingDown
from app.types import GenerationResult, PreparedRequest, SamplingParams, TokenEvent


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _item(loop: asyncio.AbstractEventLoop, tokens: int = 10, deadline: float = 1e12, **kw: object) -> WorkItem:
    request = PreparedRequest(list(range(tokens)), [], SamplingParams(), "chat")
    return WorkItem(request=request, loop=loop, deadline=deadline, **kw)  # type: ignore[arg-type]


def _result() -> GenerationResult:
    return GenerationResult(token_ids=[1], finish_reason="stop", prompt_tokens=10)


def _take(max_rows: int = 8, timeout: float | None = None, min_age_s: float = 0.0) -> Take:
    return Take(max_rows, 10_000, timeout, min_age_s, running=(0, 0), max_running_tokens=None)


TAKE_ALL = _take()


def test_a_full_queue_refuses_at_once_and_reserved_places_count(loop: asyncio.AbstractEventLoop) -> None:
    depths: list[int] = []
    queue = RequestQueue(2, on_change=depths.append)
    queue.reserve()
    queue.put(_item(loop))
    with pytest.raises(QueueFull):
        queue.put(_item(loop))  # one queued + one reserved: full
    with pytest.raises(QueueFull):
        queue.reserve()
    queue.put_many([_item(loop)], reserved=True)  # the reservation's holder takes its place over
    assert len(queue) == 2 and depths == [1, 2]
    queue.release()  # releasing a place already taken over never goes below zero
    with pytest.raises(QueueFull):
        queue.put(_item(loop))


def test_a_group_is_queued_whole_or_not_at_all(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(3)
    queue.put(_item(loop))
    with pytest.raises(QueueFull):
        queue.put_many([_item(loop) for _ in range(3)])
    assert len(queue) == 1
    queue.put_many([_item(loop) for _ in range(2)])
    assert len(queue) == 3


def test_a_closed_queue_refuses_with_shutting_down(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(4)
    queue.close()
    with pytest.raises(ShuttingDown):
        queue.reserve()
    with pytest.raises(ShuttingDown):
        queue.put(_item(loop))


def test_an_abandoned_item_gives_its_place_back_at_once(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(1)
    item = _item(loop)
    item.on_cancel = queue.discard
    queue.put(item)
    item.cancel()
    assert len(queue) == 0
    queue.put(_item(loop))  # the place is free again before any batch was taken


def test_take_answers_dead_items_and_hands_over_only_live_ones(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(8)
    cancelled, expired, alive = _item(loop), _item(loop, deadline=time.monotonic() - 1), _item(loop)
    queue.put_many([cancelled, expired, alive])
    cancelled._cancelled.set()  # cancelled without on_cancel: still queued, as when the engine's callback was not set
    assert queue.take(TAKE_ALL) == [alive]
    assert cancelled.done and expired.done and not alive.done
    with pytest.raises(RequestTimeout, match="timed out waiting"):
        loop.run_until_complete(expired.wait())
    with pytest.raises(RequestTimeout, match="cancelled"):
        loop.run_until_complete(cancelled.wait())


def test_take_waits_for_company_unless_every_free_row_can_be_filled(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(8)
    queue.put(_item(loop))
    patient = _take(max_rows=2, min_age_s=60.0)
    assert queue.take(patient) == []  # young and alone: wait for stragglers
    queue.put(_item(loop))
    assert len(queue.take(patient)) == 2  # enough to fill both free rows: no wait
    assert queue.take(_take(max_rows=0)) == []


def test_take_with_a_timeout_wakes_when_an_item_arrives(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(8)
    item = _item(loop)
    threading.Timer(0.05, queue.put, args=(item,)).start()
    assert queue.take(_take(timeout=30.0)) == [item]


def test_a_work_item_resolves_exactly_once_from_any_thread(loop: asyncio.AbstractEventLoop) -> None:
    item = _item(loop, stream=True)
    item.push(TokenEvent(token_ids=[5]))
    first = _result()
    threads = [
        threading.Thread(target=item.finish, args=(first if i == 0 else RuntimeError("late"),)) for i in range(8)
    ]
    threads[0].start()
    threads[0].join()
    for t in threads[1:]:
        t.start()
    for t in threads[1:]:
        t.join()
    item.push(TokenEvent(token_ids=[6]))  # after the end: dropped

    async def consume() -> list[list[int]]:
        return [event.token_ids async for event in item.events()]

    assert loop.run_until_complete(consume()) == [[5]]
    assert item.result is first and item.done


def test_a_plain_item_sends_no_token_events(loop: asyncio.AbstractEventLoop) -> None:
    item = _item(loop)  # stream=False: only the result travels
    item.push(TokenEvent(token_ids=[5]))
    item.finish(_result())
    assert loop.run_until_complete(item.wait()).token_ids == [1]


def test_a_closed_loop_never_fails_the_resolver(loop: asyncio.AbstractEventLoop) -> None:
    item = _item(loop, stream=True)
    loop.close()
    item.push(TokenEvent(token_ids=[5]))  # the client's loop is gone: nothing raises in the worker
    item.finish(_result())
    assert item.done


def test_cancel_after_finish_does_not_touch_the_queue(loop: asyncio.AbstractEventLoop) -> None:
    calls: list[WorkItem] = []
    item = _item(loop)
    item.on_cancel = calls.append
    item.finish(_result())
    item.cancel()
    assert calls == [] and item.cancelled


def test_a_ticket_waits_cancels_on_exit_and_reports_frozen_stats(loop: asyncio.AbstractEventLoop) -> None:
    item = _item(loop, tokens=3, enqueued_at=10.0)
    ticket = Ticket(item, timeout_s=60)
    assert ticket.stats() == TicketStats(3, 0, 0.0, 0.0, (0, 1, 2), None)  # queued: nothing yet
    item.started_at = 12.5
    assert ticket.stats().queue_s == 2.5  # started: its wait counts, its run not yet
    done = GenerationResult(token_ids=[7, 8], finish_reason="stop", prompt_tokens=3, queue_time_s=2.5, run_time_s=1.0)
    item.finish(done)
    assert loop.run_until_complete(ticket.result()) is done and ticket.final is done and ticket.cancelled
    assert ticket.stats() == TicketStats(3, 2, 2.5, 1.0, (0, 1, 2), (7, 8))


def test_a_ticket_past_its_deadline_is_a_timeout_and_cancels(loop: asyncio.AbstractEventLoop) -> None:
    ticket = Ticket(_item(loop, deadline=time.monotonic() - 1.0), timeout_s=2)
    with pytest.raises(RequestTimeout, match="within 2 s"):
        loop.run_until_complete(ticket.result())
    assert ticket.cancelled and ticket.final is None
