"""The sampler alone: one step for 32 rows of 131,072 logits, free and grammar-constrained.

Free rows (the default run): greedy, default chat sampling and temperature 0.7. It finds the model's modules
where each tree has them (`app/model/compute/` and `app/model/text/` since issue 25, `app/model/` before), so
the same script measures an earlier checkout (run it with that checkout's root on PYTHONPATH) and this one,
in turn:

    for tree in ../wt-base .; do (cd $tree && PYTHONPATH=$PWD python $OLDPWD/bench/sampler.py); done

CPU time of one thread per call (torch.set_num_threads(1)), so another process on the machine moves it less.
Logits are randn x 4: the tiny model's logit scale (std 4).

`--constrained`: 32 rows under `response_format: json_object` or a required tool call (the grammars of
bench/throughput.py's chat_json and chat_tools), greedy and default sampling, decoding 64-token answers
(a row that ends is replaced by a fresh one, as a server at concurrency 32 keeps its batch full). As the
worker does, the masks are prefetched before each step (that fill overlaps the forward pass: it is shown
apart and not counted in the step). Per step, split by stage (thread CPU time, and wall time), by wrapping
the sampler's stage functions in this script: fill (llguidance), unpack, apply (masking, beyond unpack),
draw, closing (`settle`), consume (the matcher's `advance`), other (the rest of `step`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch

from app.types import SamplingParams


def model_module(name: str) -> ModuleType:
    """`app.model.<half>.<name>` in this tree, `app.model.<name>` in trees before the model's two halves."""
    for path in (f"app.model.compute.{name}", f"app.model.text.{name}", f"app.model.{name}"):
        try:
            return importlib.import_module(path)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"no app.model module {name!r} in this tree")


Row = model_module("generate").Row
sample = model_module("generate").sample


def per_call_ms(logits: torch.Tensor, params: SamplingParams, calls: int = 5) -> float:
    rows = [Row([1], [], params) for _ in range(logits.shape[0])]
    sample(logits, rows)
    started = time.process_time()
    for _ in range(calls):
        sample(logits, rows)
    return (time.process_time() - started) / calls * 1000


def free() -> None:
    logits = torch.randn(32, 131_072, generator=torch.Generator().manual_seed(0)) * 4
    cases = {
        "greedy": SamplingParams(),
        "default 0.2/0.95": SamplingParams(temperature=0.2, top_p=0.95),
        "temperature 0.7": SamplingParams(temperature=0.7),
    }
    print(", ".join(f"{name} {per_call_ms(logits, params):.1f} ms" for name, params in cases.items()))


# -- constrained rows -------------------------------------------------------------------------------
TOOL = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
TOOL["required"] = ["city", "days"]
SAMPLING = {"greedy": {"temperature": 0.0}, "default": {"temperature": 0.2, "top_p": 0.95}}


class Stages:
    """Thread CPU time and wall time per stage, summed over the steps of one run."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self._open: list[str] = []
        self._wrapped: list[tuple[Any, str, Any]] = []

    def restore(self) -> None:
        for owner, name, original in reversed(self._wrapped):
            setattr(owner, name, original)

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        original = vars(owner)[name]
        self._wrapped.append((owner, name, original))

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timing(stage):
                return original(*args, **kwargs)

        setattr(owner, name, timed)

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Nested stages count only in the innermost: `apply` is masking without the unpack inside it."""
        cpu, wall = time.thread_time(), time.perf_counter()
        self._open.append(stage)
        try:
            yield
        finally:
            self._open.pop()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            self.cpu[stage] += cpu
            self.wall[stage] += wall
            for outer in self._open[-1:]:
                self.cpu[outer] -= cpu
                self.wall[outer] -= wall


def instrument(stages: Stages) -> None:
    """Every stage function the sampler has (names differ between trees: those missing are skipped)."""
    sampling, constrained = model_module("sampling"), model_module("constrained")
    try:
        masks: Any = model_module("masks")
    except ImportError:  # trees before it: the masks lived in the sampler
        masks = sampling
    for owner, name, stage in (
        (getattr(masks, "MaskFiller", sampling.Sampler), "_fill", "fill"),
        (masks, "unpack", "unpack"),
        (sampling.Sampler, "_masked", "apply"),
        (sampling, "apply", "apply"),
        (sampling, "_fix_refused", "refused"),
        (sampling, "_choose", "draw"),
        (constrained.GrammarConstraint, "settle", "closing"),
        (constrained.GrammarConstraint, "advance", "consume"),
        (sampling.Sampler, "step", "step"),
    ):
        if name in vars(owner):
            stages.wrap(owner, name, stage)


def constrainer() -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from app.model.tiny import FULL_VOCAB, build_tekken

    path = Path(tempfile.mkdtemp(prefix="tekken-full-")) / "tekken.json"
    path.write_text(json.dumps(build_tekken("v11", FULL_VOCAB)), encoding="utf-8")
    tekken = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    try:
        vocab = model_module("vocabulary").read_vocab(tekken)
    except ModuleNotFoundError:  # trees before the model's two halves
        vocab = model_module("toolcalls").TokenVocab.from_tekken(tekken)
    return model_module("constrained").Constrainer(vocab)


def factories(c: Any) -> dict[str, Callable[[], Any]]:
    try:
        values = importlib.import_module("app.model.values")
    except ModuleNotFoundError:  # trees before the model's two halves
        values = model_module("constrained")
    FunctionSpec, OutputSpec = values.FunctionSpec, values.OutputSpec
    return {
        "json_object": c.factory(OutputSpec(json_schema={"type": "object"})),
        "tool required": c.factory(OutputSpec((FunctionSpec("get_weather", TOOL),), "required")),
    }


def run(factory: Callable[[], Any], sampling: dict[str, float], steps: int, seed: int) -> tuple[Stages, int, str]:
    """`steps` steps of 32 rows; returns the stage times, how many answers ended, and a digest of every
    token taken (equal digests between trees: the same tokens)."""
    Sampler = model_module("sampling").Sampler
    sampler, stages, ended, made, digest = Sampler(threads=2), Stages(), 0, 0, hashlib.sha256()

    def fresh() -> Row:
        nonlocal made
        made += 1
        params = SamplingParams(max_new_tokens=64, seed=seed * 1000 + made, **sampling)  # type: ignore[arg-type]
        return Row([1], [], params, constraint=factory())

    rows = [fresh() for _ in range(32)]
    generator = torch.Generator().manual_seed(seed)
    instrument(stages)
    try:
        for _ in range(steps):
            step(sampler, rows, torch.randn(32, 131_072, generator=generator) * 4)
            for i, row in enumerate(rows):
                if row.generated[-1] == cast(Any, row.constraint).eos or len(row.generated) >= 64:
                    digest.update(repr(row.generated).encode())
                    rows[i], ended = fresh(), ended + 1
    finally:
        stages.restore()
    for row in rows:
        digest.update(repr(row.generated).encode())
    return stages, ended, digest.hexdigest()[:12]


def step(sampler: Any, rows: list[Row], logits: torch.Tensor) -> None:
    """One step as the worker takes it: prefetch (during the forward pass), then the sampler's step."""
    sampler.prefetch(rows)
    if sampler._pending is not None:
        sampler._pending.result()
    for row, token in zip(rows, sampler.sample(logits, rows), strict=True):
        assert isinstance(token, int), token
        row.generated.append(token)


def constrained(steps: int, repeats: int) -> None:
    made = factories(constrainer())
    torch.set_num_threads(1)
    print(f"load: {os.getloadavg()}")
    for grammar, factory in made.items():
        for name, params in SAMPLING.items():
            for repeat in range(repeats):
                stages, ended, digest = run(factory, params, steps, repeat)
                stages.restore()
                per = {k: v / steps * 1000 for k, v in stages.cpu.items()}
                wall = {k: v / steps * 1000 for k, v in stages.wall.items()}
                total_cpu, total_wall = (
                    sum(v for k, v in per.items() if k != "fill"),
                    sum(v for k, v in wall.items() if k != "fill"),
                )
                parts = ", ".join(f"{k} {per[k]:.2f}/{wall[k]:.2f}" for k in sorted(per))
                print(
                    f"{grammar:13} {name:7} step {total_cpu:5.2f} ms cpu / {total_wall:5.2f} ms wall"
                    f" ({ended} answers ended, tokens {digest}) | cpu/wall ms: {parts}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--constrained", action="store_true", help="32 grammar-constrained rows, by stage")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.constrained:
        constrained(args.steps, args.repeats)
    else:
        torch.set_num_threads(1)
        free()


if __name__ == "__main__":
    main()
