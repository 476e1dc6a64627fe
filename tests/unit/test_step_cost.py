"""bench/step_cost.py's counting rule: compute ops counted from a real profile, views and allocations left out,
and per-layer figures as the difference of two depths."""

from __future__ import annotations

from collections import Counter
from types import ModuleType

import torch
from torch.profiler import ProfilerActivity, profile

from tests.support import bench_scripts


def _bench() -> ModuleType:
    return bench_scripts.load("step_cost")


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
