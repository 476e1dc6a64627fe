"""A smaller bench/load.py in the suite: a mixed burst against an in-process server, where every
request gets exactly one answer, no valid request gets a 5xx, and 429s (each with Retry-After) come
only when the queue is full. Resident memory is checked by the bench, against a server subprocess.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from app.model.compute.loader import LoadedModel
from tests.support import bench_scripts
from tests.support.server import serve

N = 120
CONCURRENCY = 32


def _bench() -> ModuleType:
    return bench_scripts.load("load")


load: Any = _bench()


@pytest.mark.parametrize(
    ("max_queue", "expect_429"), [(4 * CONCURRENCY, False), (8, True)], ids=["big-queue", "small-queue"]
)
def test_every_request_gets_exactly_one_answer(
    loaded: LoadedModel, tiny_dir: Path, max_queue: int, expect_429: bool
) -> None:
    overrides: dict[str, Any] = {"transcription_tokens_per_audio_s": 1, "transcription_min_tokens": 8}
    with serve(loaded, tiny_dir, max_queue=max_queue, max_batch_size=16, **overrides) as server:
        tally = asyncio.run(load.run_load(server.base_url, load.plan(N), CONCURRENCY))
        assert server.engine.waiting == 0
    assert tally.sent == N
    assert tally.check(expect_429) == [], (tally.problems, tally.statuses)
    valid = sum(n for (kind, status), n in tally.statuses.items() if kind in load.VALID and status == 200)
    assert valid > (N // 10 if expect_429 else N * 0.85)  # the queue refuses some, never all
    assert {kind for kind, _ in tally.statuses} == {*load.VALID, *load.BAD}


def test_the_plan_is_fixed_and_mixed() -> None:
    requests = load.plan(1000)
    assert requests == load.plan(1000)
    bad = sum(1 for r in requests if r.kind in load.BAD)
    assert bad == 100
    assert {r.kind for r in requests} == {*load.VALID, *load.BAD}


def test_the_tally_catches_what_it_must() -> None:
    tally = load.Tally(sent=3, answered=2, failed=1)
    tally.statuses["chat_audio", 503] += 1
    tally.statuses["chat_stream", 429] += 1
    tally.retry_after_missing = 1
    wrong = " | ".join(tally.check(expect_429=False))
    for part in ("no proper answer", "5xx", "429(s) although", "without Retry-After"):
        assert part in wrong
    assert "no 429" in " | ".join(load.Tally().check(expect_429=True))
    with pytest.raises(ValueError, match="DONE"):
        load._check_stream(['data: {"choices": []}'])
