"""What the engine calls on the model: five operations over batch states.

`app.model.compute.generate.BatchGenerator` is the one the server runs. The engine depends on these calls
only, so whoever builds an engine can hand it a generator wrapped to observe or alter them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from app.model.compute.generate import BatchState, Row


class ModelRunner(Protocol):
    def prefill(self, rows: Sequence[Row]) -> tuple[BatchState, torch.Tensor]:
        """Run the prompts of `rows`; their batch state and next-token logits."""
        ...

    def step(self, state: BatchState, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feed one token per row of `state` (host ids, or a tensor); the next logits."""
        ...

    def select(self, state: BatchState, keep: list[int]) -> BatchState:
        """Only the rows at `keep` (repeated indices copy a row)."""
        ...

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        """One state holding the rows of both."""
        ...

    def release(self, state: BatchState) -> None:
        """`state`'s step failed: free its slots now, keeping nothing of them."""
        ...


Wrap = Callable[[ModelRunner], ModelRunner]
"""Given the model's runner, the one the engine is to call: the same, or one that wraps it."""


def as_is(runner: ModelRunner) -> ModelRunner:
    return runner
