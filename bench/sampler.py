"""The sampler alone: one step for 32 rows of 131,072 logits, greedy, default chat sampling and temperature 0.7.

Imports `app.model.generate.Row` and `sample`, which every tree since the engine issue has, so the same script
measures an earlier checkout (run it with that checkout's root on PYTHONPATH) and this one, in turn:

    for tree in ../wt-base .; do (cd $tree && PYTHONPATH=$PWD python $OLDPWD/bench/sampler.py); done

CPU time of one thread per call (torch.set_num_threads(1)), so another process on the machine moves it less.
Logits are randn x 4: the tiny model's logit scale (std 4).
"""

from __future__ import annotations

import time

import torch

from app.model.generate import Row, sample
from app.types import SamplingParams


def per_call_ms(logits: torch.Tensor, params: SamplingParams, calls: int = 5) -> float:
    rows = [Row([1], [], params) for _ in range(logits.shape[0])]
    sample(logits, rows)
    started = time.process_time()
    for _ in range(calls):
        sample(logits, rows)
    return (time.process_time() - started) / calls * 1000


def main() -> None:
    torch.set_num_threads(1)
    logits = torch.randn(32, 131_072, generator=torch.Generator().manual_seed(0)) * 4
    cases = {
        "greedy": SamplingParams(),
        "default 0.2/0.95": SamplingParams(temperature=0.2, top_p=0.95),
        "temperature 0.7": SamplingParams(temperature=0.7),
    }
    print(", ".join(f"{name} {per_call_ms(logits, params):.1f} ms" for name, params in cases.items()))


if __name__ == "__main__":
    main()
