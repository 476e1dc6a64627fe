"""Per-token bookkeeping of the model worker, this tree against another: `TokenStep.apply` (the worker's
`_emit` before it) over 32 rows of one step.

The worker split (issue 14) moved the stop rules into app/engine/stopping.py: a few more calls per token.
The end-to-end benchmark (throughput.py --baseline-src) cannot see a microsecond on a shared CPU, so this
times the per-token path alone: each tree runs in its own subprocess, the trees take turns round by round,
and each figure is the minimum over repeats (load only ever adds time). No model: rows, work items and
sampled tokens are built directly, and the per-token path is called as each tree has it: the public
`app.engine.stopping.TokenStep.apply(row, item, token, now)`, or in an earlier tree the worker's private
`_emit`, the only entry it had (the worker made with `__new__` and the fields it reads). Not streamed: a
streamed token adds a write to the event loop's self-pipe, the same syscall in both trees, and its noise.

    python bench/emit_overhead.py --baseline-src /path/to/earlier/tree --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROWS, STEPS = 32, 64


def measure() -> float:
    """Microseconds per row per step of the per-token path, min over repeats, in the tree on PYTHONPATH."""
    from app.metrics import Metrics
    from app.types import PreparedRequest, Sampled, SamplingParams

    loop = asyncio.new_event_loop()
    params = SamplingParams(max_new_tokens=10**6, stop_strings=("zzz",))
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    emit = _token_path(Metrics(), decode)
    tokens = [Sampled(100 + i) for i in range(ROWS)]

    def one_run() -> None:
        rows = [_row(PreparedRequest([1] * 50, [], params, "chat"), loop) for _ in range(ROWS)]
        for step in range(STEPS):
            now = float(step)
            for (row, item), token in zip(rows, tokens, strict=True):
                emit(row, item, token, now)

    best = min(timeit.repeat(one_run, number=1, repeat=15))
    loop.close()
    return best / (ROWS * STEPS) * 1e6


def _token_path(metrics: Any, decode: Callable[[list[int]], str]) -> Callable[[Any, Any, Any, float], object]:
    """`TokenStep.apply(row, item, token, now)`; in a tree from before it, the worker's `_emit`, the
    only way in there was (made with `__new__` and the fields it reads)."""
    from app.engine import stopping

    if hasattr(stopping, "TokenStep"):
        return stopping.TokenStep(stopping.StopRules({2}, decode), metrics).apply
    from app.engine.worker import ModelWorker

    worker = ModelWorker.__new__(ModelWorker)
    worker.metrics = metrics
    if hasattr(worker, "_finish_reason"):  # before the worker split
        worker.eos, worker.decode = {2}, decode
    else:
        worker.stopping = stopping.StopRules({2}, decode)
    return lambda row, item, token, now: worker._emit(row, token, now)


def _row(request: Any, loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
    """A row and the work item it answers: the row carries the item's key, or in older trees the item."""
    try:
        from app.model.compute.row import Row
    except ImportError:  # a tree from before app/model/compute/
        from app.model.row import Row  # type: ignore[no-redef]

    item_module = "app.engine.item" if importlib.util.find_spec("app.engine.item") else "app.engine.work"
    item = __import__(item_module, fromlist=["WorkItem"]).WorkItem(request, loop, deadline=1e12)
    fields = Row.__dataclass_fields__
    link = {"key": item.key} if "key" in fields else {"owner": item}
    return Row(request.input_ids, [], request.sampling, **link), item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return
    trees = {"this": Path(__file__).resolve().parents[1], "baseline": args.baseline_src.resolve()}
    ratios = []
    for r in range(args.rounds):
        us = {}
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-src", str(tree), "--measure"]
            us[name] = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
        ratios.append(us["this"] / us["baseline"])
        print(json.dumps({"round": r, **{k: round(v, 3) for k, v in us.items()}, "ratio": round(ratios[-1], 3)}))
    print(
        f"this / baseline, us per row per step: median {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f}) over {args.rounds} rounds"
    )


if __name__ == "__main__":
    main()
