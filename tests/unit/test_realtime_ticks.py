"""bench/realtime_ticks.py's arithmetic and model: a stream's cache as the engine's pool allocates it, the
decoder window shortened only when the caches do not fit, and a random model built on the meta device that
the engine steps."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from app.model.realtime.pool import StreamPool
from tests.support import bench_scripts


def _bench() -> ModuleType:
    return bench_scripts.load("realtime_ticks")


def test_stream_bytes_is_what_the_pool_allocates_and_the_model_is_real(tmp_path: Path) -> None:
    bench = _bench()
    cfg = bench.config("tiny")
    model = bench.model(cfg, torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert torch.isfinite(model.lm_head.weight).all() and float(model.lm_head.weight.std()) > 0
    pool = StreamPool.allocate(model, 3)
    assert pool.bytes_per_stream() == bench.stream_bytes(cfg, torch.float32)
    line = bench.measure(model, bench.processor(tmp_path), streams=2, ticks=2)
    assert line["rows"] == 2 and line["join_rows"] == 2 and line["streams"] == 2


def test_the_decoder_window_shrinks_only_when_the_caches_do_not_fit() -> None:
    bench = _bench()
    cfg = bench.config("mini")
    full = bench.stream_bytes(cfg, torch.bfloat16)
    assert 0.9 * 2**30 < full < 1.1 * 2**30  # Mini's windows: about 1 GiB a stream
    assert bench.window_that_fits(cfg, torch.bfloat16, 32, 33 * full) == 8192
    shorter = bench.window_that_fits(cfg, torch.bfloat16, 128, 40 * 2**30)
    assert 0 < shorter < 8192 and shorter % 256 == 0
    assert 129 * bench.stream_bytes(cfg, torch.bfloat16, shorter) <= 40 * 2**30
    assert 129 * bench.stream_bytes(cfg, torch.bfloat16, shorter + 256) > 40 * 2**30
    assert bench.window_that_fits(cfg, torch.bfloat16, 128, 2**30) == 0  # not even the encoder's rings
