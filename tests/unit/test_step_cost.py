"""bench/step_cost.py's counting rule: compute ops counted from a real profile, views and allocations left out,
and per-layer figures as the difference of two depths."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

BENCH = Path(__file__).resolve().parents[2] / "bench" / "step_cost.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("step_cost", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_compute_ops_and_leaves_views_out() -> None:
    bench = _bench()
    x = torch.ones(4, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = x.t().reshape(-1).unsqueeze(0) + 1  # views, then one add
        torch.mm(y.view(3, 4), x)
    ops = bench.compute_ops(event.name for event in prof.events())
    assert ops["aten::add"] == 1 and ops["aten::mm"] == 1
    assert not set(ops) & bench.EXCLUDED
    assert {"aten::t", "aten::unsqueeze", "aten::view"} <= bench.EXCLUDED


def test_per_layer_is_the_difference_of_two_depths() -> None:
    bench = _bench()
    shallow = Counter({"aten::mm": 2 * 4 + 1, "aten::add": 2 * 3 + 5})
    deep = Counter({"aten::mm": 30 * 4 + 1, "aten::add": 30 * 3 + 5})
    assert bench.per_layer(deep, shallow, 30) == {"aten::mm": 4.0, "aten::add": 3.0}
    assert bench.split(deep, shallow, 30, 0) == (str(30 * 7 + 6), "7.0", "6")


def _step_ops(model_dir: Path, layers: int, rows: int) -> Counter[str]:
    """The compute ops of one lean decode step of a `layers`-deep tiny model over `rows` rows."""
    bench = _bench()
    gen = bench.generator(bench.build(model_dir, layers, seed=0), max_len=512, slots=rows)
    from app.model.compute.generate import Row
    from app.types import SamplingParams

    state, _ = gen.prefill([Row(bench.prompt(i, 40), [], SamplingParams()) for i in range(rows)])
    tokens = [100 + i for i in range(rows)]
    gen.step(state, tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen.step(state, tokens)
    ops: Counter[str] = bench.compute_ops(event.name for event in prof.events())
    return ops


def test_the_lean_step_launches_42_ops_a_layer(tmp_path: Path) -> None:
    """Issue 26's launch budget (<= 45 a layer) as a count that can regress: per layer, ONE fused QKV and ONE
    gate-up projection (4 matmuls in all), ONE cache write for keys and values, ONE attention call."""
    from app.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    shallow, deep = _step_ops(model_dir, 2, 3), _step_ops(model_dir, 6, 3)
    bench = _bench()
    layer = bench.per_layer(deep, shallow, 6)
    assert sum(layer.values()) <= 42, layer
    assert layer["aten::mm"] == 4 and layer["aten::index_put_"] == 1
    assert layer["aten::scaled_dot_product_attention"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_writes_its_logits_into_a_shared_buffer(tmp_path: Path, dtype: torch.dtype) -> None:
    """What every captured graph does (app/model/compute/graphs.py): logits written into rows of one buffer,
    the same numbers as a step that returns its own, and no more ops (the head's matmul writes there, or the
    float32 conversion does)."""
    from app.model.compute.decoder import decoder_for
    from app.model.compute.slots import CachePlan, CacheShape, SlotCache
    from app.model.tiny import build_tiny_model

    bench = _bench()
    model = bench.build(build_tiny_model(tmp_path / "tiny", seed=0), 2, seed=0).to(dtype)
    decoder = decoder_for(model)
    cache = SlotCache(CacheShape.of(model.config.text_config, dtype), CachePlan(4, 256), [torch.device("cpu")] * 2)
    cache.ready(128, 5)
    packed = torch.tensor([[5, 6, 11, 11], [3, 7, 0, 0], [0, 1, 4, 4], [1, 0, 0, 0]])
    buffer = torch.full((8, model.config.text_config.vocab_size), float("nan"))
    with torch.inference_mode():  # as BatchGenerator steps and captures
        want = decoder(packed, 128, cache)
        with profile(activities=[ProfilerActivity.CPU]) as alone:
            decoder(packed, 128, cache)
        with profile(activities=[ProfilerActivity.CPU]) as shared:
            got = decoder(packed, 128, cache, buffer[:4])
    assert got.data_ptr() == buffer.data_ptr() and got.dtype == torch.float32
    assert torch.equal(buffer[:4], want) and bool(buffer[4:].isnan().all())
    count = [bench.compute_ops(e.name for e in p.events()).total() for p in (alone, shared)]
    assert count[1] <= count[0], count
