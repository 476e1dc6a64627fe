"""Fair sharing between clients: the pure order and cap (fairness.py), the batcher's rounds, the queue's
per-owner share and fair takes, and the rate-limited refusal log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from app.engine.batcher import select_batch
from app.engine.config import EngineConfig
from app.engine.fairness import client_of, fair_order, over_share, part_of
from app.engine.item import WorkItem
from app.engine.queue import RequestQueue
from app.engine.scheduler import Scheduler, Take
from app.errors import QueueFull, RateLimited
from app.metrics import Metrics
from app.refusals import Refusals, Throttle
from app.types import PreparedRequest, SamplingParams


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _item(loop: asyncio.AbstractEventLoop, owner: str, tokens: int = 10, choices: int = 1) -> WorkItem:
    request = PreparedRequest(list(range(tokens)), [], SamplingParams(choices=choices), "chat")
    return WorkItem(request=request, loop=loop, deadline=1e12, owner=owner)


def _take(max_rows: int, held: dict[str, int] | None = None, max_tokens: int = 10_000) -> Take:
    return Take(max_rows, max_tokens, None, 0.0, running=(0, 0), max_running_tokens=None, held=held or {})


def test_the_fair_order_is_round_robin_across_owners_and_oldest_first_within_one() -> None:
    order, rounds = fair_order(["a", "a", "a", "b", "a", "c", "b"])
    assert order == [0, 3, 5, 1, 6, 2, 4]
    assert rounds == [0, 0, 0, 1, 1, 2, 3]


def test_an_owner_holding_rows_already_goes_after_those_holding_none() -> None:
    order, rounds = fair_order(["a", "a", "b"], held={"a": 2})
    assert order == [2, 0, 1] and rounds == [0, 2, 3]


def test_with_one_owner_the_fair_order_is_the_age_order() -> None:
    assert fair_order(["a"] * 5)[0] == [0, 1, 2, 3, 4]
    assert fair_order([]) == ([], [])


def test_one_client_s_parts_share_its_rounds_and_take_turns_within_them() -> None:
    # Client k's line, round-robin by session: k/a, k/b, k/a, k/a; client j is served beside k's first.
    order, rounds = fair_order(["k/a", "k/a", "k/a", "k/b", "j"])
    assert order == [0, 4, 3, 1, 2] and rounds == [0, 0, 1, 2, 3]
    # Rows in the worker count for the part and for its client: k/a holds 2, so k/b's goes first, after j's.
    order, rounds = fair_order(["k/a", "k/b", "j"], held={"k/a": 2})
    assert order == [2, 1, 0] and rounds == [0, 2, 3]
    # Many sessions of one client cost another client nothing: j's next request is always in round 0 or 1.
    order, _ = fair_order([f"k/{n}" for n in range(10)] + ["j", "j"])
    assert order[:2] == [0, 10] and order.index(11) == 3


def test_an_owner_names_its_client_and_part() -> None:
    assert part_of("key:1a2b", "sess_x") == "key:1a2b/sess_x"
    assert client_of("key:1a2b/sess_x") == client_of("key:1a2b") == "key:1a2b"
    assert client_of("addr:::1") == "addr:::1"


def test_a_lower_round_goes_before_a_closer_length() -> None:
    # Without rounds the 100-token request joins the anchor for its length; with them the 500-token one of
    # round 0 goes first, and the round-1 request only fits after it.
    assert select_batch([100, 100, 500], 2, 10_000) == [0, 1]
    assert select_batch([100, 100, 500], 2, 10_000, rounds=[0, 1, 0]) == [0, 2]


def test_rounds_keep_the_token_budgets_and_the_rows_of_n() -> None:
    # The prefill budget: 3 rows of 500 would be 1500 > 1200, so the third request waits whatever its round.
    assert select_batch([400, 500, 500], 8, 1200, rounds=[0, 0, 0]) == [0, 1]
    # A request of n=3 rows fits only where 3 places are free; the anchor always goes, alone if it must.
    assert select_batch([10, 10, 10], 3, 10_000, rows=[1, 3, 1], rounds=[0, 0, 1]) == [0, 2]
    assert select_batch([900, 10], 4, 100, rounds=[0, 0]) == [0]
    # The running budget: nothing joins when the first in fair order does not fit.
    assert select_batch([50, 10], 4, 10_000, running=(3, 40), max_running_tokens=160, rounds=[0, 1]) == []


def test_a_flood_from_one_owner_does_not_delay_the_others(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(100)
    flood = [_item(loop, "flood") for _ in range(20)]
    queue.put_many(flood)
    good = [_item(loop, "good-1"), _item(loop, "good-2")]
    for item in good:
        queue.put(item)
    batch = queue.take(_take(4))
    assert batch == [flood[0], good[0], good[1], flood[1]]
    # The flood already holds rows in the worker: the other owners' next requests go first.
    late = _item(loop, "good-1")
    queue.put(late)
    assert queue.take(_take(2, held={"flood": 2, "good-1": 1, "good-2": 1})) == [late, flood[2]]


def test_a_group_of_pieces_is_taken_whole_by_rows_and_stays_whole_in_the_queue(
    loop: asyncio.AbstractEventLoop,
) -> None:
    queue = RequestQueue(10, max_per_owner=2)
    pieces = [_item(loop, "file") for _ in range(5)]
    queue.put_many(pieces)  # more pieces than the share: allowed, the owner held nothing
    with pytest.raises(RateLimited):
        queue.put_many([_item(loop, "file"), _item(loop, "file")])
    assert len(queue) == 5
    n_rows = _item(loop, "chat", choices=3)
    queue.put(n_rows)
    batch = queue.take(_take(4))
    assert batch == [pieces[0], n_rows]  # its 3 rows fill the 4 places with the first piece
    assert queue.take(_take(8)) == pieces[1:]


def test_an_owner_past_its_share_is_refused_while_others_still_have_room(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(10, max_per_owner=3)
    queue.reserve("a")
    queue.put_many([_item(loop, "a")], reserved=True)  # its own reservation is not counted twice
    queue.put(_item(loop, "a"))
    queue.reserve("a")
    with pytest.raises(RateLimited) as refused:
        queue.reserve("a")
    assert isinstance(refused.value, QueueFull) and refused.value.code == "rate_limit_exceeded"
    assert refused.value.retry_after_s >= 1
    with pytest.raises(RateLimited):
        queue.put(_item(loop, "a"))
    queue.put(_item(loop, "b"))  # another owner is not refused
    assert queue.held_by("a") == 3 and queue.held_by("b") == 1
    queue.release("a")
    queue.put(_item(loop, "a"))  # a place given back is the owner's again
    assert queue.held_by("a") == 3


def test_the_parts_of_one_client_are_capped_together(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(10, max_per_owner=3)
    queue.reserve("k/a")
    queue.put(_item(loop, "k/a"))
    queue.put(_item(loop, "k/b"))
    with pytest.raises(RateLimited):  # a third session of the same key: the key's share is taken
        queue.put(_item(loop, "k/c"))
    with pytest.raises(RateLimited):
        queue.reserve("k")
    queue.put(_item(loop, "j/a"))  # another client is not refused
    assert queue.held_by("k/c") == queue.held_by("k") == 3
    queue.put_many([_item(loop, "k/a")], reserved=True)  # the reservation is taken over, not counted twice
    assert queue.held_by("k/a") == 3


def test_the_scheduler_hands_the_queue_what_each_owner_holds() -> None:
    scheduler = Scheduler(
        EngineConfig(max_queue=8, max_batch_size=4, max_batch_tokens=100, max_wait_ms=0, request_timeout_s=1)
    )
    want = scheduler.take(idle=False, first=True, held=2, running=(2, 10), owners={"a": 2})
    assert want.held == {"a": 2} and want.max_rows == 2


def test_over_share_never_refuses_an_owner_holding_nothing() -> None:
    assert not over_share(0, 50, 4)
    assert over_share(1, 4, 4) and not over_share(1, 3, 4)
    assert not over_share(100, 100, None)


def test_refusals_are_counted_every_time_and_logged_once_per_owner_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    metrics = Metrics()
    refusals = Refusals(metrics, Throttle(10.0, clock=lambda: now[0]))
    with caplog.at_level(logging.WARNING, logger="app.refusals"):
        for _ in range(5):
            refusals.note("session_pending", "sess_a", "too many")
        refusals.note("session_pending", "sess_b", "too many")
        now[0] = 11.0
        refusals.note("session_pending", "sess_a", "too many")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert "sess_a" in lines[0] and "more refused" not in lines[0]
    assert "sess_b" in lines[1]
    assert "4 more refused" in lines[2]
    assert metrics.registry.get_sample_value("voxtral_refusals_total", {"reason": "session_pending"}) == 7
