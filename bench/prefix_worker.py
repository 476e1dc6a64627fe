"""The model worker's CPU time per request with prefix caching on and off, nothing to reuse, in-process.

The no-reuse case of bench/prefix_cache.py without HTTP, the engine or a second server: two `BatchGenerator`s
over one tiny model (one with `prefix_caching`), each fed the same kind of load in turns (distinct random
prompts, --concurrency rows at most, 8 admitted a prefill, --tokens each, rows retired through `select` as the
engine's worker does), with `time.thread_time` around the generator's calls. It also times the prefix cache's
own host bookkeeping (the prompt's hashing at prefill, `_retain`, `_publish`) and counts slot copies, which
vary less than the totals do on a shared machine.

    python bench/prefix_worker.py --rounds 6
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.model.compute.features import LogMel  # noqa: E402
from app.model.compute.generate import BatchGenerator, BatchState, Row, sample  # noqa: E402
from app.types import SamplingParams  # noqa: E402

BOOKKEEPING = ("_row_chain", "_chain", "_retain", "_publish")


def timed(gen: BatchGenerator, spent: dict[str, float]) -> None:
    """Time the generator's prefix bookkeeping into `spent` (outermost calls only)."""
    depth = [0]

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            start = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[name] = spent.get(name, 0.0) + time.thread_time() - start

        return run

    for name in BOOKKEEPING:
        if hasattr(gen, name):  # `_row_chain`: not in every version
            setattr(gen, name, wrap(name, getattr(gen, name)))


def serve(gen: BatchGenerator, prompts: list[list[int]], concurrency: int, tokens: int) -> dict[str, float]:
    """Decode every prompt; CPU seconds spent in `prefill`, `select` and `step`."""
    pending = [Row(p, [], SamplingParams()) for p in prompts]
    state: BatchState | None = None
    spent = {"prefill": 0.0, "select": 0.0, "step": 0.0}

    def call(name: str, *args: Any) -> Any:
        start = time.thread_time()
        out = getattr(gen, name)(*args)
        spent[name] += time.thread_time() - start
        return out

    while pending or state is not None:
        room = concurrency - (len(state.rows) if state is not None else 0)
        if pending and room > 0:
            admitted, pending = pending[: min(room, 8)], pending[min(room, 8) :]
            new, logits = call("prefill", admitted)
            for row, token in zip(new.rows, sample(logits, new.rows), strict=True):
                row.generated.append(int(token))  # type: ignore[arg-type]
            state = new if state is None else gen.merge(state, new)
        assert state is not None
        keep = [i for i, row in enumerate(state.rows) if len(row.generated) < tokens]
        if len(keep) < len(state.rows):
            state = call("select", state, keep)
            if not state.rows:
                state = None
                continue
        logits = call("step", state, [row.generated[-1] for row in state.rows])
        for row, token in zip(state.rows, sample(logits, state.rows), strict=True):
            row.generated.append(int(token))  # type: ignore[arg-type]
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--n", type=int, default=96, help="requests a run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=667, help="tokens a prompt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> None:
    """Build and load the tiny model under `work`, then the rounds; print the figures."""
    from app.model.compute.loader import load_model

    loaded = load_model(Settings(model="tiny", cache_dir=work))
    log_mel = LogMel(loaded.processor.feature_extractor, 3000)
    gens = {c: BatchGenerator(loaded.model, 11, log_mel, prefix_caching=c == "on") for c in ("on", "off")}
    bookkeeping: dict[str, float] = {}
    timed(gens["on"], bookkeeping)
    copies = {"on": 0, "off": 0}
    copying = {"on": 0.0, "off": 0.0}
    for config, gen in gens.items():
        copy = gen._copy

        def counted(sources: list[int], targets: list[int], length: int, c: str = config, f: Any = copy) -> None:
            copies[c] += len(sources)
            start = time.thread_time()
            f(sources, targets, length)
            copying[c] += time.thread_time() - start

        gen._copy = counted  # type: ignore[method-assign]
    totals: dict[str, list[float]] = {"on": [], "off": []}
    rng = random.Random(0)
    for round_ in range(args.rounds):
        for config in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            prompts = [[rng.randrange(100, 2900) for _ in range(args.prompt)] for _ in range(args.n)]
            spent = serve(gens[config], prompts, args.concurrency, args.tokens)
            parts = {k: round(v / args.n * 1000, 3) for k, v in spent.items()}
            totals[config].append(sum(spent.values()) / args.n * 1000)
            print(f"round {round_} {config}: ms a request {parts}, total {totals[config][-1]:.3f}", flush=True)
    ratios = [a / b for a, b in zip(totals["on"], totals["off"], strict=True)]
    requests = args.n * args.rounds
    print(
        f"worker CPU ms a request, median: on {statistics.median(totals['on']):.3f}, off "
        f"{statistics.median(totals['off']):.3f}; on/off {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    print("prefix bookkeeping ms a request (on):", {k: round(v / requests * 1000, 4) for k, v in bookkeeping.items()})
    print("slot rows copied a request:", {k: round(v / requests, 2) for k, v in copies.items()})
    print("slot copies' CPU ms a request:", {k: round(v / requests * 1000, 4) for k, v in copying.items()})


if __name__ == "__main__":
    main()
