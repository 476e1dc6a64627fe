"""The realtime reader's pace (app/api/realtime/pace.py): a token bucket per connection."""

from __future__ import annotations

import pytest

from app.api.realtime.pace import TokenBucket


def test_a_burst_is_read_at_once_then_events_are_paced_at_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.take() == pytest.approx(0.1)  # the burst is spent: the next read waits for a token
    now[0] += 0.1
    assert bucket.take() == pytest.approx(0.1)  # sustained: one event per 1/rate
    now[0] += 0.1
    assert bucket.take() == pytest.approx(0.1)


def test_the_bucket_refills_up_to_its_burst_and_no_further() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=100.0, burst=4, clock=lambda: now[0])
    for _ in range(4):
        bucket.take()
    now[0] += 60.0  # a minute of quiet earns the burst back, not 6,000 events
    assert [bucket.take() > 0 for _ in range(4)] == [False, False, False, True]


def test_a_client_at_the_rate_never_waits() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=200.0, burst=400, clock=lambda: now[0])
    waits = []
    for _ in range(5000):  # 100 s of 20 ms chunks (50 events/s)
        now[0] += 0.02
        waits.append(bucket.take())
    assert max(waits) == 0.0
