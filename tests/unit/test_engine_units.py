"""The worker's decisions on plain inputs, no model and no thread: the out-of-memory row cap, what the
scheduler takes each turn, the stop rules and result of a row, and the rows of abandoned requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from app.engine.batcher import select_batch
from app.engine.config import EngineConfig
from app.engine.item import WorkItem
from app.engine.oom import CLEAN_STEPS, RowCap
from app.engine.scheduler import IDLE_POLL_S, Scheduler, Take
from app.engine.stopping import StopRules, abandoned, result, still_wanted
from app.errors import RequestTimeout
from app.model.compute.row import Row
from app.types import PreparedRequest, Sampled, SamplingParams, TokenLogprob

EOS = 2


def config(**overrides: object) -> EngineConfig:
    base: dict[str, object] = {
        "max_queue": 8,
        "max_batch_size": 8,
        "max_batch_tokens": 1000,
        "max_wait_ms": 50.0,
        "request_timeout_s": 60.0,
        "max_running_tokens": 4000,
    }
    return EngineConfig(**{**base, **overrides})  # type: ignore[arg-type]


# -- the row cap -------------------------------------------------------------------------------------


def test_a_row_cap_after_out_of_memory_stops_the_batch_growing_straight_back() -> None:
    """The cap halves on each OOM and relaxes one row per 64 clean steps, up to no cap at all."""
    cap = RowCap(8)
    assert cap.limit == 8 and cap.cap is None
    cap.on_oom(4)
    assert cap.limit == 4
    cap.on_oom(6)  # a later, larger OOM never raises the cap
    assert cap.limit == 4
    for _ in range(CLEAN_STEPS):
        cap.on_clean_step()
    assert cap.limit == 5
    for _ in range(3 * CLEAN_STEPS):
        cap.on_clean_step()
    assert cap.cap is None and cap.limit == 8


def test_an_out_of_memory_error_restarts_the_count_of_clean_steps() -> None:
    cap = RowCap(8, relax_after=3)
    cap.on_oom(4)
    cap.on_clean_step()
    cap.on_clean_step()
    cap.on_oom(4)  # two clean steps, then a failure: three more are needed
    cap.on_clean_step()
    cap.on_clean_step()
    assert cap.limit == 4
    cap.on_clean_step()
    assert cap.limit == 5


def test_the_row_cap_never_goes_below_one_row_and_lifts_when_idle() -> None:
    cap = RowCap(8)
    cap.on_oom(0)
    assert cap.limit == 1
    cap.on_clean_step()  # no effect before `relax_after` steps
    assert cap.limit == 1
    cap.reset()
    assert cap.cap is None and cap.limit == 8
    uncapped = RowCap(8)
    uncapped.on_clean_step()  # without a cap, clean steps change nothing
    assert uncapped.cap is None and uncapped.limit == 8


# -- the scheduler -----------------------------------------------------------------------------------


def test_an_idle_worker_waits_for_a_first_request_but_not_for_stragglers() -> None:
    scheduler = Scheduler(config())
    first = scheduler.take(idle=True, first=True, held=0, running=(0, 0))
    assert first == Take(8, 1000, IDLE_POLL_S, 0.0, (0, 0), 4000)
    assert scheduler.take(idle=True, first=False, held=3, running=(3, 50)).timeout is None


def test_a_busy_worker_waits_max_wait_ms_for_company_and_takes_only_free_places() -> None:
    scheduler = Scheduler(config(max_wait_ms=50.0))
    take = scheduler.take(idle=False, first=True, held=5, running=(5, 120))
    assert take == Take(3, 1000, None, 0.05, (5, 120), 4000)


def test_the_row_cap_limits_what_the_queue_may_give() -> None:
    scheduler = Scheduler(config())
    scheduler.cap.on_oom(2)
    assert scheduler.limit == 2
    assert scheduler.take(idle=False, first=True, held=1, running=(1, 10)).max_rows == 1
    assert scheduler.take(idle=False, first=True, held=2, running=(2, 10)).max_rows == 0


def test_static_batching_takes_only_into_an_empty_batch_and_fills_it_before_decoding() -> None:
    continuous, static = Scheduler(config()), Scheduler(config(continuous_batching=False))
    assert continuous.takes_new(idle=False) and continuous.takes_new(idle=True)
    assert not continuous.fills_before_decoding()
    assert not static.takes_new(idle=False) and static.takes_new(idle=True)
    assert static.fills_before_decoding()


def test_parked_rows_come_back_oldest_first_within_the_cap_and_budgets() -> None:
    scheduler = Scheduler(config(max_batch_tokens=300, max_running_tokens=None))
    assert scheduler.readmit([100, 100, 100, 100], running=(0, 0)) == [0, 1, 2]  # 3 x 100 fill the prefill budget
    scheduler.cap.on_oom(3)
    assert scheduler.readmit([100, 100, 100], running=(2, 80)) == [0]  # one free place under the cap
    assert scheduler.readmit([100], running=(3, 80)) == []
    assert scheduler.readmit([], running=(0, 0)) == []


def test_a_parked_row_waits_when_the_running_batch_has_no_room_for_its_cache() -> None:
    scheduler = Scheduler(config(max_running_tokens=1000))
    assert scheduler.readmit([300, 90], running=(4, 100)) == []  # 5 x 300 > 1000: the oldest blocks
    assert scheduler.readmit([100, 90], running=(4, 100)) == [0, 1]


# -- stopping ----------------------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


ITEMS: dict[int, WorkItem] = {}
"""The work items of the rows `row` makes, by key (as the worker holds them)."""


def row(loop: asyncio.AbstractEventLoop, **sampling: object) -> Row:
    params = SamplingParams(**sampling)  # type: ignore[arg-type]
    item = WorkItem(PreparedRequest([1, 2, 3], [], params, "chat"), loop, deadline=1e9, enqueued_at=10.0)
    ITEMS[item.key] = item
    return Row([1, 2, 3], [], params, key=item.key)


def owner(r: Row) -> WorkItem:
    return ITEMS[r.key]


def letters(ids: list[int]) -> str:
    """A vocabulary of one letter per token: 97 is "a"."""
    return "".join(chr(i) for i in ids)


RULES = StopRules({EOS}, letters)


def test_eos_and_stop_tokens_stop_the_row_and_stay_out_of_the_answer(loop: asyncio.AbstractEventLoop) -> None:
    r = row(loop, stop_token_ids=frozenset({7}))
    assert RULES.reason(r, 97) is None and RULES.record(r, Sampled(97))
    for stop in (EOS, 7):
        assert RULES.reason(r, stop) == "stop"
        assert not RULES.record(r, Sampled(stop))
    assert r.generated == [97]


def test_the_token_limit_ends_the_row_with_length(loop: asyncio.AbstractEventLoop) -> None:
    r = row(loop, max_new_tokens=3)
    reasons = []
    for token in (97, 98, 99):
        reasons.append(RULES.reason(r, token))
        RULES.record(r, Sampled(token))
    assert reasons == [None, None, "length"] and r.generated == [97, 98, 99]
    assert RULES.reason(row(loop, max_new_tokens=1), EOS) == "stop"  # a stop token outranks the limit


def test_a_stop_string_ends_the_row_on_the_token_that_completes_it(loop: asyncio.AbstractEventLoop) -> None:
    r = row(loop, stop_strings=("cd",), max_new_tokens=100)
    reasons = []
    for token in map(ord, "abcd"):
        reasons.append(RULES.reason(r, token))
        RULES.record(r, Sampled(token))
    assert reasons == [None, None, None, "stop"]
    long = row(loop, stop_strings=("zz",), max_new_tokens=1000)
    long.generated = [ord("a")] * 500 + [ord("z")]
    assert RULES.reason(long, ord("z")) == "stop"  # found in the window at the end of a long answer
    assert RULES.reason(long, ord("y")) is None


def test_log_probs_are_recorded_with_their_tokens(loop: asyncio.AbstractEventLoop) -> None:
    r = row(loop, logprobs=0)
    lp = TokenLogprob(97, -0.5)
    assert RULES.record(r, Sampled(97, lp)) and RULES.record(r, Sampled(98))
    assert not RULES.record(r, Sampled(EOS, TokenLogprob(EOS, -0.1)))
    assert r.generated == [97, 98] and r.logprobs == [lp]


def test_the_result_carries_tokens_reason_and_times_from_the_work_item(loop: asyncio.AbstractEventLoop) -> None:
    r = row(loop, logprobs=0)
    r.generated, r.logprobs = [97, 98], [TokenLogprob(97, -0.5), TokenLogprob(98, -0.25)]
    owner(r).started_at, owner(r).first_token_at = 12.0, 13.5
    done = result(r, owner(r), "length", now=20.0)
    assert done.token_ids == [97, 98] and done.finish_reason == "length" and done.prompt_tokens == 3
    assert (done.queue_time_s, done.run_time_s, done.time_to_first_token_s) == (2.0, 8.0, 3.5)
    assert done.logprobs == r.logprobs and done.logprobs is not r.logprobs
    r.generated.append(99)
    assert done.token_ids == [97, 98]  # a copy: the row's list is not the answer's


def test_a_result_without_log_probs_asked_has_none(loop: asyncio.AbstractEventLoop) -> None:
    r = row(loop)
    done = result(r, owner(r), "stop", now=10.0)  # never started: every time measured up to now
    assert done.logprobs is None and done.token_ids == []
    assert (done.queue_time_s, done.run_time_s, done.time_to_first_token_s) == (0.0, 0.0, 0.0)


def test_rows_of_abandoned_requests_are_answered_and_dropped(loop: asyncio.AbstractEventLoop) -> None:
    waiting, cancelled, expired = row(loop), row(loop), row(loop)
    owner(cancelled).cancel()
    owner(expired).deadline = 0.0
    assert [abandoned(owner(r), now=1.0) for r in (waiting, cancelled, expired)] == [False, True, True]
    assert still_wanted([waiting, cancelled, expired], ITEMS) == [waiting]
    assert owner(cancelled).done and owner(expired).done and not owner(waiting).done
    with pytest.raises(RequestTimeout, match="cancelled while running"):
        loop.run_until_complete(owner(expired).wait())


def test_batcher_takes_oldest_then_similar_lengths() -> None:
    assert select_batch([100, 900, 110, 95, 2000], max_rows=3, max_tokens=10_000) == [0, 2, 3]
    assert select_batch([], 4, 100) == []


def test_batcher_respects_the_token_budget_but_never_starves_the_oldest() -> None:
    assert select_batch([5000, 100, 100], max_rows=8, max_tokens=1000) == [0]
    assert select_batch([400, 400, 400, 400], max_rows=8, max_tokens=1000) == [0, 1]


def test_batcher_counts_the_n_rows_of_a_request() -> None:
    """A request with n choices takes n places in the batch and n rows of the running budget; its prompt
    counts once against the prefill budget."""
    assert select_batch([100, 100, 100], max_rows=5, max_tokens=10_000, rows=[4, 2, 1]) == [0, 2]
    assert select_batch([100, 100], max_rows=3, max_tokens=10_000, rows=[4, 1]) == []  # the oldest waits
    assert select_batch([100, 100], max_rows=8, max_tokens=200, rows=[4, 4]) == [0, 1]
    running = select_batch([100, 100], 8, 10_000, running=(2, 100), max_running_tokens=700, rows=[4, 1])
    assert running == [0, 1]
    assert select_batch([100], 8, 10_000, running=(4, 100), max_running_tokens=700, rows=[4]) == []


def test_batcher_keeps_the_running_batch_within_its_token_budget() -> None:
    # 4 rows of width 100 run; budget 1000: two short ones fit (6 x 100), a 300-wide one does not (5 x 300).
    assert select_batch([100, 90, 80], 8, 10_000, running=(4, 100), max_running_tokens=1000) == [0, 1, 2]
    assert select_batch([300, 90], 8, 10_000, running=(4, 100), max_running_tokens=1000) == []
    # The oldest blocks the others, so the batch drains and it runs next; when nothing runs it goes.
    assert select_batch([300, 90], 8, 10_000, running=(0, 0), max_running_tokens=100) == [0]
    assert select_batch([100] * 12, 8, 10_000, running=(4, 100), max_running_tokens=1000) == list(range(6))
