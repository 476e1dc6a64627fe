"""Per-token bookkeeping of the model worker, this tree against another: `_emit` over 32 rows of one step.

The worker split (issue 14) moved the stop rules into app/engine/stopping.py: a few more calls per token.
The end-to-end benchmark (throughput.py --baseline-src) cannot see a microsecond on a shared CPU, so this
times the per-token path alone: each tree runs in its own subprocess, the trees take turns round by round,
and each figure is the minimum over repeats (load only ever adds time). No model: rows, work items and
sampled tokens are built directly; the worker is made with `__new__` and the fields `_emit` reads,
which differ between the trees (`eos`/`decode` before the split, `stopping` after). Not streamed: a
streamed token adds a write to the event loop's self-pipe, the same syscall in both trees, and its noise.

    python bench/emit_overhead.py --baseline-src /path/to/earlier/tree --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import timeit
from pathlib import Path

ROWS, STEPS = 32, 64


def measure() -> float:
    """Microseconds per row per step of `_emit`, min over repeats, in the tree on PYTHONPATH."""
    from app.engine.worker import ModelWorker
    from app.metrics import Metrics
    from app.model.compute.row import Row
    from app.types import PreparedRequest, Sampled, SamplingParams

    engine_dir = Path(sys.modules[ModelWorker.__module__].__file__ or "").parent
    item_module = "app.engine.item" if (engine_dir / "item.py").exists() else "app.engine.work"
    work_item = __import__(item_module, fromlist=["WorkItem"]).WorkItem
    worker = ModelWorker.__new__(ModelWorker)
    worker.metrics = Metrics()
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    if hasattr(worker, "_finish_reason"):  # before the split
        worker.eos, worker.decode = {2}, decode
    else:
        from app.engine.stopping import StopRules

        worker.stopping = StopRules({2}, decode)
    loop = asyncio.new_event_loop()
    params = SamplingParams(max_new_tokens=10**6, stop_strings=("zzz",))
    tokens = [Sampled(100 + i) for i in range(ROWS)]

    def one_run() -> None:
        rows = []
        for _ in range(ROWS):
            item = work_item(PreparedRequest([1] * 50, [], params, "chat"), loop, deadline=1e12)
            rows.append(Row(item.request.input_ids, [], params, owner=item))
        for step in range(STEPS):
            now = float(step)
            for row, token in zip(rows, tokens, strict=True):
                worker._emit(row, token, now)

    best = min(timeit.repeat(one_run, number=1, repeat=15))
    loop.close()
    return best / (ROWS * STEPS) * 1e6


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
