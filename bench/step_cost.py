"""What one decode step launches and costs on the host: this tree against an earlier one, taking turns.

A tiny-width Voxtral built with the real classes (the tiny checkpoint's config: hidden 64, 4 heads, 2 KV heads,
head_dim 16) at the depth of Voxtral Mini (30 layers) and Small (40), random weights (seeded), float32, CPU,
one thread. For 1, 8 and 32 rows of a few hundred text tokens (`BatchGenerator.prefill`, a few warm-up
`step`s), it measures:

- ops: `torch.profiler` over one `BatchGenerator.step`, counting `aten::` ops other than the views and
  allocations of EXCLUDED (every occurrence, nested ones included: `linear -> matmul -> mm` is three). "Per
  layer" is (ops at N layers - ops at 2 layers) / (N - 2); "outside" is what is left at N layers;
- host time: the CPU time of the (one) thread over each of `--steps` calls of `BatchGenerator.step` (median
  and min), and the ratio this tree / the other, taken within each round; the wall time beside it. On a CPU
  the host does the whole step; its thread's CPU time moves less than the wall time when other processes
  share the cores (as bench/sampler.py measures);
- that host time split in two: inside `scaled_dot_product_attention` (on a CPU the attention kernel runs on
  the host; on a GPU it is one launch and device time) and the rest, each with its ratio.

Each variant runs in its own subprocess with its tree first on PYTHONPATH (both trees name their modules
alike); the parent alternates them (baseline, this tree, baseline, ...) for `--rounds` rounds, so a shared
machine that drifts moves both alike, and prints markdown tables. The baseline is the tree before the lean
decode step (issue 26), e.g. commit 9fd01ff:

    git archive 9fd01ff | tar -x -C /tmp/base-9fd01ff
    python bench/step_cost.py --baseline-src /tmp/base-9fd01ff --rounds 3

Without --baseline-src only this tree runs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE, OURS = "today", "lean"
EXCLUDED = frozenset(
    "aten::" + name
    for name in (
        "empty",
        "view",
        "as_strided",
        "reshape",
        "expand",
        "t",
        "transpose",
        "slice",
        "select",
        "squeeze",
        "unsqueeze",
        "alias",
        "detach",
        "lift",
    )
)
"""Op names not counted: views and allocations, which launch no kernel (the issue's list, matched exactly)."""
ALSO_EXCLUDED = frozenset({"aten::to", "aten::empty_like", "aten::empty_strided"})
"""Left out of the second count too: a `to` that converts counts its `_to_copy` already, and the other two
allocate. Without them the baseline tree gives the figures of /work/shared/perf/decode-step-baseline.md."""
BASE_LAYERS = 2
"""The shallow model the per-layer figures subtract."""


def compute_ops(names: Iterable[str]) -> Counter[str]:
    """How often each counted op occurs among profiler event `names`: `aten::` ops not in EXCLUDED."""
    return Counter(n for n in names if n.startswith("aten::") and n not in EXCLUDED)


def per_layer(deep: Counter[str], shallow: Counter[str], layers: int) -> dict[str, float]:
    """Each op's count a layer: the difference between a `layers`-deep and a BASE_LAYERS-deep model's step."""
    span = layers - BASE_LAYERS
    return {op: (deep[op] - shallow[op]) / span for op in deep | shallow if deep[op] != shallow[op]}


def split(deep: Counter[str], shallow: Counter[str], layers: int, strict: int) -> tuple[str, str, str]:
    """Ops a step, per layer and outside the layers at `layers` deep; `strict`: ALSO_EXCLUDED left out."""
    if strict:
        deep, shallow = (Counter({k: v for k, v in c.items() if k not in ALSO_EXCLUDED}) for c in (deep, shallow))
    layer = (deep.total() - shallow.total()) / (layers - BASE_LAYERS)
    return str(deep.total()), f"{layer:.1f}", f"{deep.total() - layer * layers:.0f}"


# --- one variant, in its own process ---------------------------------------------------------------


def prompt(row: int, tokens: int) -> list[int]:
    """A few hundred text ids (rows of slightly different lengths: the batch is padded)."""
    length = tokens - (row * 7) % 48
    return [1] + [1000 + (row * 31 + i * 17) % 1900 for i in range(length - 1)]


def generator(model: Any, max_len: int, slots: int) -> Any:
    """A BatchGenerator on either tree: with a CachePlan of `slots` x `max_len` where the tree takes one."""
    from app.model.compute import generate

    make: Any = generate.BatchGenerator  # log_mel None: text rows only, no audio features to compute
    if "cache" in inspect.signature(make).parameters:
        from app.model.compute.slots import CachePlan

        return make(model, pad_token_id=11, log_mel=None, cache=CachePlan(slots, max_len))
    return make(model, pad_token_id=11, log_mel=None)


def build(model_dir: Path, layers: int, seed: int) -> Any:
    import torch
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration

    config = VoxtralConfig.from_pretrained(model_dir)
    text: Any = config.text_config
    text.num_hidden_layers = layers
    config._attn_implementation = "sdpa"  # the server's default (Settings.attn_implementation)
    torch.manual_seed(seed)
    return VoxtralForConditionalGeneration(config).float().eval()


def measure(gen: Any, rows: int, args: argparse.Namespace, count: bool, steps: int) -> dict[str, Any]:
    """Prefill `rows`, warm up, profile one step (when `count`), then time `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    from app.model.compute.generate import Row
    from app.types import SamplingParams

    state, _ = gen.prefill([Row(prompt(i, args.prompt_tokens), [], SamplingParams()) for i in range(rows)])
    tokens = [100 + i for i in range(rows)]
    for _ in range(args.warmup):
        gen.step(state, tokens)
    ops: Counter[str] = Counter()
    if count:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen.step(state, tokens)
        ops = compute_ops(event.name for event in prof.events())
    wall, cpu, attention = [], [], []
    for _ in range(steps):
        inside[0] = 0.0
        started, started_cpu = time.perf_counter(), time.thread_time()
        gen.step(state, tokens)
        cpu.append((time.thread_time() - started_cpu) * 1e3)
        wall.append((time.perf_counter() - started) * 1e3)
        attention.append(inside[0] * 1e3)
    del state
    rest = [c - a for c, a in zip(cpu, attention, strict=True)]
    return {"rows": rows, "ops": dict(ops), "cpu_ms": cpu, "wall_ms": wall, "attn_ms": attention, "rest_ms": rest}


inside = [0.0]
"""Thread CPU seconds spent in `scaled_dot_product_attention` during the current step (`timed_attention`)."""


def timed_attention() -> None:
    """Both trees call `torch.nn.functional.scaled_dot_product_attention` by attribute (the lean step, and
    transformers' sdpa attention): wrapped, each call's thread CPU time adds to `inside`. The two clock reads
    a call cost both trees alike (one call a layer in each)."""
    import torch.nn.functional as F

    kernel = F.scaled_dot_product_attention

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        out = kernel(*args, **kwargs)
        inside[0] += time.thread_time() - started
        return out

    F.scaled_dot_product_attention = wrapped


def worker(args: argparse.Namespace) -> None:
    """One variant (whatever tree is first on PYTHONPATH): a JSON line a (layers, rows)."""
    import gc

    import torch

    torch.set_num_threads(1)
    timed_attention()
    for layers in sorted(set(args.count_layers) | set(args.time_layers)):
        count = args.count and layers in args.count_layers
        steps = args.steps if layers in args.time_layers else 0
        if not count and not steps:
            continue
        gen = generator(build(args.model_dir, layers, args.seed), args.max_len, max(args.rows))
        for rows in args.rows:
            result = measure(gen, rows, args, count, steps)
            print(json.dumps({"layers": layers, **result}), flush=True)
            gc.collect()  # a lean state frees its slots when collected
        del gen
        gc.collect()


# --- the parent: turns and tables ------------------------------------------------------------------


def run_variant(tree: Path, args: argparse.Namespace, count: bool) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model-dir", str(args.model_dir)]
    cmd += ["--rows", ",".join(map(str, args.rows)), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--count-layers", ",".join(map(str, args.count_layers))]
    cmd += ["--time-layers", ",".join(map(str, args.time_layers))]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--max-len", str(args.max_len), "--seed", str(args.seed)]
    cmd += ["--count"] if count else []
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: exit {out.returncode}\n{out.stderr[-4000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def print_ops(counts: dict[str, dict[tuple[int, int], Counter[str]]], args: argparse.Namespace) -> None:
    """Ops a step: total, per layer, outside the layers; then the largest per-layer counts."""
    print(f"\nCompute ops of one step (aten:: ops except {', '.join(sorted(EXCLUDED))}).")
    print(f"Per layer = (ops at N layers - ops at {BASE_LAYERS}) / (N - {BASE_LAYERS}).")
    print(f"Second figure of each cell: also without {', '.join(sorted(ALSO_EXCLUDED))}.\n")
    print("| variant | layers | rows | ops a step | per layer | outside the layers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, by_key in counts.items():
        for layers in (n for n in args.count_layers if n != BASE_LAYERS):
            for rows in args.rows:
                cells = [split(by_key[(layers, rows)], by_key[(BASE_LAYERS, rows)], layers, x) for x in (0, 1)]
                pairs = " | ".join(f"{a} / {b}" for a, b in zip(*cells, strict=True))
                print(f"| {label} | {layers} | {rows} | {pairs} |")
    deepest = max(args.count_layers)
    for rows in (min(args.rows), max(args.rows)):
        tables = {
            label: per_layer(by_key[(deepest, rows)], by_key[(BASE_LAYERS, rows)], deepest)
            for label, by_key in counts.items()
        }
        union = {op for t in tables.values() for op in t}
        names = sorted(sorted(union), key=lambda op: -max(t.get(op, 0) for t in tables.values()))
        print(f"\nPer layer at {rows} row(s) ({deepest} and {BASE_LAYERS} layers), every op whose count differs:\n")
        print("| op | " + " | ".join(tables) + " |")
        print("| --- |" + " --- |" * len(tables))
        for op in names:
            print(f"| {op} | " + " | ".join(f"{t.get(op, 0):g}" for t in tables.values()) + " |")


def print_times(
    times: dict[str, dict[tuple[int, int], list[list[float]]]], clock: str, args: argparse.Namespace
) -> None:
    """Host ms a step: median and min over the rounds' steps, and the within-round ratio this tree / baseline."""
    both = BASELINE in times and OURS in times
    print(f"\n{clock} of one step, ms ({args.steps} steps a round, {args.rounds} rounds; median (min)).")
    if both:
        print(f"Ratio {OURS}/{BASELINE} of each round's median (and min): median over rounds (lowest-highest).\n")
    head = "| layers | rows | " + " | ".join(f"{label} ms" for label in times)
    print(head + (" | ratio of medians | ratio of mins |" if both else " |"))
    print("| --- | --- |" + " --- |" * (len(times) + (2 if both else 0)))
    for layers in args.time_layers:
        for rows in args.rows:
            cells = []
            for by_key in times.values():
                pooled = [t for r in by_key[(layers, rows)] for t in r]
                cells.append(f"{statistics.median(pooled):.2f} ({min(pooled):.2f})")
            if both:
                pairs = list(zip(times[OURS][(layers, rows)], times[BASELINE][(layers, rows)], strict=True))
                cells.append(_spread([statistics.median(o) / statistics.median(b) for o, b in pairs]))
                cells.append(_spread([min(o) / min(b) for o, b in pairs]))
            print(f"| {layers} | {rows} | " + " | ".join(cells) + " |")


def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from app.model.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="voxtral-step-cost-"))
    args.model_dir = build_tiny_model(work / "tiny", seed=args.seed)
    trees = {BASELINE: args.baseline_src.resolve()} if args.baseline_src else {}
    trees[OURS] = ROOT
    counts: dict[str, dict[tuple[int, int], Counter[str]]] = {label: {} for label in trees}
    clocks = {
        "cpu_ms": "Host time (the thread's CPU time)",
        "wall_ms": "Wall time",
        "attn_ms": "Host time inside scaled_dot_product_attention (the attention kernel itself, on a CPU)",
        "rest_ms": "Host time outside scaled_dot_product_attention",
    }
    times: dict[str, dict[str, dict[tuple[int, int], list[list[float]]]]] = {
        clock: {label: {} for label in trees} for clock in clocks
    }
    started = time.monotonic()
    for r in range(args.rounds):
        for label, tree in trees.items():
            for result in run_variant(tree, args, count=r == 0):
                key = (result["layers"], result["rows"])
                if r == 0 and key[0] in args.count_layers:
                    counts[label][key] = Counter(result["ops"])
                for clock in clocks if result["cpu_ms"] else ():
                    times[clock][label].setdefault(key, []).append(result.get(clock, []))
            print(f"round {r} {label}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    print_ops(counts, args)
    for clock, title in clocks.items():
        print_times(times[clock], title, args)
    if args.out:
        out = {"counts": _keyed(counts), **{clock: _keyed(times[clock]) for clock in clocks}}
        args.out.write_text(json.dumps(out, indent=1))


def _keyed(table: dict[str, dict[tuple[int, int], Any]]) -> dict[str, dict[str, Any]]:
    return {label: {f"{k[0]}x{k[1]}": v for k, v in by_key.items()} for label, by_key in table.items()}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, default=None, help="the earlier tree (today's step)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each variant takes")
    parser.add_argument("--rows", type=_ints, default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=30, help="timed steps a round at each row count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--count-layers", type=_ints, default=[BASE_LAYERS, 30, 40])
    parser.add_argument("--time-layers", type=_ints, default=[30, 40])
    parser.add_argument("--prompt-tokens", type=int, default=300, help="the longest row's prompt")
    parser.add_argument("--max-len", type=int, default=4096, help="positions of the lean tree's cache plan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the counts and every step's ms as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if BASE_LAYERS not in args.count_layers:
        parser.error(f"--count-layers must include {BASE_LAYERS}")
    worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    main()
