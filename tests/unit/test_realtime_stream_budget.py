"""Realtime streams sized from the KV budget (app/model/compute/budget.py: `stream_count`, `plan_streams`):
--realtime-max-streams, or as many as the budget holds beside the pool's scratch slot; none: a one-line refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.model.compute.budget import plan_streams, stream_count
from app.model.compute.loader import ModelLoadError, load_model
from app.model.realtime.pool import StreamPool
from tests.support.server import make_settings


@pytest.mark.parametrize(
    ("budget", "wanted", "streams"),
    [(100 * 40, 32, 32), (100 * 33, 32, 32), (100 * 32, 32, 31), (100 * 11 + 99, 32, 10), (200, 32, 1)],
)
def test_streams_are_the_setting_or_what_fits_beside_the_scratch_slot(budget: int, wanted: int, streams: int) -> None:
    assert stream_count(100, wanted, budget) == streams


def test_a_budget_without_room_for_one_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="holds no realtime stream"):
        stream_count(2**30, 32, 2**31 - 1)


def test_the_tiny_realtime_model_gets_what_its_budget_holds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The pool the engine allocates for N streams is N + 1 of what the probe measures, so a budget of exactly
    5 of them holds 4 streams; a budget of one holds none and the start-up fails in one line."""
    settings = make_settings(tmp_path, model="tiny-realtime")
    loaded = load_model(settings)
    per_stream = StreamPool.allocate(loaded.model, 0).nbytes()
    assert StreamPool.allocate(loaded.model, 4).nbytes() == 5 * per_stream
    caplog.set_level("INFO")
    fits = make_settings(tmp_path, model="tiny-realtime", kv_cache_memory_bytes=5 * per_stream)
    assert plan_streams(loaded.model, fits, per_stream) == 4
    assert "realtime streams: 4 (of --realtime-max-streams 32)" in caplog.text
    roomy = make_settings(tmp_path, model="tiny-realtime", kv_cache_memory_bytes=100 * per_stream)
    assert plan_streams(loaded.model, roomy, per_stream) == 32
    none = make_settings(tmp_path, model="tiny-realtime", kv_cache_memory_bytes=per_stream)
    with pytest.raises(ModelLoadError, match="holds no realtime stream") as refused:
        plan_streams(loaded.model, none, per_stream)
    assert "\n" not in str(refused.value)
