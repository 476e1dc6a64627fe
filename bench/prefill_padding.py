"""A fresh prefill of prompts of different lengths: this tree against an earlier one, taking turns.

Four text prompts of `--tokens`, 3/4, 1/2 and 1/4 of it, prefilled together (`BatchGenerator.prefill`, nothing
found cached) on a tiny-width Voxtral (bench/step_cost.py's `build`: the tiny checkpoint's config, 4 heads
over 2 KV heads, `--layers` deep, float32, CPU, one thread). It prints, for each tree:

- how attention was called (from a wrapper around `scaled_dot_product_attention`): with a mask or causal, and
  with its keys and values expanded to every query head or read in place (`enable_gqa`). A GPU runs its flash
  kernel only on the second form, causal and unmasked; the first is its memory-efficient kernel over the
  whole square, plus a copy of the keys and values per query head (transformers' `repeat_kv`);
- the host time of a prefill (thread CPU time: on a CPU the host does the whole prefill) and of the attention
  kernel inside it, medians over each round's prefills, and the ratios this tree / the other within rounds.

With `--extend`, the four rows instead share one cached prefix of `--tokens` (prefix caching on: prefilled,
left, found) and prefill only their tails of 64, 48, 32 and 16 tokens together: the attention of a prefix-cache
hit (causal aligned to the lower right, app/model/compute/attention.py).

The baseline is the tree before right-padded prefills, e.g. commit 1e124a7:

    git archive 1e124a7 | tar -x -C /tmp/base-1e124a7
    python bench/prefill_padding.py --baseline-src /tmp/base-1e124a7 --rounds 5
    python bench/prefill_padding.py --baseline-src /tmp/base-1e124a7 --rounds 5 --extend
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASELINE, OURS = "left-padded", "right-padded"


def worker(args: argparse.Namespace) -> None:
    """One variant (whatever tree is first on PYTHONPATH): one JSON line."""
    import gc

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "bench"))
    import step_cost

    from app.model.compute.generate import Row
    from app.types import SamplingParams

    torch.set_num_threads(1)
    kernel = F.scaled_dot_product_attention
    calls: list[str] = []
    inside = [0.0]

    def wrapped(*a: Any, **kw: Any) -> Any:
        masked = kw.get("attn_mask", a[3] if len(a) > 3 else None) is not None
        calls.append(f"{'masked' if masked else 'causal' if kw.get('is_causal') else 'full'}"
                     f"{', gqa in place' if kw.get('enable_gqa') else ''}, {a[1].shape[1]} key heads")  # fmt: skip
        started = time.thread_time()
        out = kernel(*a, **kw)
        inside[0] += time.thread_time() - started
        return out

    F.scaled_dot_product_attention = wrapped
    model = step_cost.build(args.model_dir, args.layers, args.seed)
    lengths = [args.tokens * k // 4 for k in (4, 3, 2, 1)]
    gen = step_cost.generator(model, args.tokens + 128, len(lengths) + 1)
    shared = step_cost.prompt(0, args.tokens)
    if args.extend:  # the rows extend one cached prefix by tails of 64, 48, 32 and 16 tokens
        rows = [Row(shared + [1000 + i] * (16 * (4 - i)), [], SamplingParams()) for i in range(4)]
    else:
        gen.prefix = None  # a fresh prefill each time: nothing found cached
        rows = [Row(step_cost.prompt(i, n), [], SamplingParams()) for i, n in enumerate(lengths)]
    cpu, attention = [], []
    for i in range(args.warmup + args.prefills):
        if args.extend:  # the prefix cached afresh (its slot is taken by a row in place and freed unindexed)
            held, _ = gen.prefill([Row(list(shared), [], SamplingParams())])
            gen.select(held, [])
        calls.clear()
        inside[0] = 0.0
        started = time.thread_time()
        state, _ = gen.prefill(rows)
        if args.extend and rows[0].cached_tokens != len(shared) // 16 * 16:
            raise RuntimeError(f"the prefix was not found cached: {rows[0].cached_tokens} tokens")
        if i >= args.warmup:
            cpu.append((time.thread_time() - started) * 1e3)
            attention.append(inside[0] * 1e3)
        gen.release(state)
        del state
        gc.collect()
    print(json.dumps({"cpu_ms": cpu, "attn_ms": attention, "calls": sorted(set(calls))}), flush=True)


def run_variant(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model-dir", str(args.model_dir)]
    cmd += ["--tokens", str(args.tokens), "--layers", str(args.layers), "--prefills", str(args.prefills)]
    cmd += ["--warmup", str(args.warmup), "--seed", str(args.seed)] + (["--extend"] if args.extend else [])
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: exit {out.returncode}\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    return result


def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from app.model.tiny import build_tiny_model

    args.model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="voxtral-prefill-")) / "tiny", seed=args.seed)
    trees = {BASELINE: args.baseline_src.resolve()} if args.baseline_src else {}
    trees[OURS] = ROOT
    medians: dict[str, dict[str, list[float]]] = {label: {"cpu_ms": [], "attn_ms": []} for label in trees}
    calls: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for label, tree in trees.items():
            result = run_variant(tree, args)
            calls[label] = result["calls"]
            for clock in ("cpu_ms", "attn_ms"):
                medians[label][clock].append(statistics.median(result[clock]))
        print(f"round {r} done", file=sys.stderr, flush=True)
    lengths = [args.tokens * k // 4 for k in (4, 3, 2, 1)]
    what = f"{args.tokens} cached + 64, 48, 32, 16 new" if args.extend else f"{lengths}"
    print(f"Prefill of {what} tokens, {args.layers} layers, {args.rounds} rounds x {args.prefills} prefills\n")
    for label in trees:
        print(f"- {label}: attention called {'; '.join(calls[label])}")
    print("\n| clock | " + " | ".join(f"{label} (ms)" for label in trees) + " | ratio |")
    print("|---|" + "---|" * (len(trees) + 1))
    for clock, title in (("cpu_ms", "whole prefill"), ("attn_ms", "attention kernel")):
        cells = [f"{statistics.median(medians[label][clock]):.1f}" for label in trees]
        ratio = "-"
        if BASELINE in trees:
            ratios = [o / b for o, b in zip(medians[OURS][clock], medians[BASELINE][clock], strict=True)]
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"| {title} | " + " | ".join(cells) + f" | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, default=None, help="the earlier tree (left-padded prefills)")
    parser.add_argument("--rounds", type=int, default=5, help="turns each variant takes")
    parser.add_argument("--tokens", type=int, default=2048, help="the longest prompt")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefills", type=int, default=3, help="timed prefills a round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extend", action="store_true", help="rows extending one cached prefix of --tokens")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    main()
