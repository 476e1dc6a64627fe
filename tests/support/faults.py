"""Faults injected by wrapping the real generator: no hook in the server's own code.

`serve()` (tests/support/server.py) builds every test server's engine over a `FaultyGenerator` that passes
each call on to the real `BatchGenerator`. A test sets `server.generator.fault` to a callable that sees each model call
before it runs, as `(stage, rows)` with stage "prefill", "merge" or "step" and the model rows it concerns
(for a merge: the rows joining the batch); `server.engine.ticket(row.key)` is the ticket of a row's request
while the worker holds it. It may raise (torch.OutOfMemoryError, RuntimeError)
to make that call fail as the model would, block to hang the model, or just record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from app.engine.runner import ModelRunner
from app.model.compute.generate import BatchState, Row

Fault = Callable[[str, list[Row]], None]


class FaultyGenerator:
    def __init__(self) -> None:
        self.inner: ModelRunner | None = None
        self.fault: Fault | None = None
        """Called before each prefill, merge and decode step while set; None: every call goes through."""

    def wrap(self, inner: ModelRunner) -> FaultyGenerator:
        """Given to `create_app(wrap_generator=...)`: the engine then calls this object."""
        self.inner = inner
        return self

    def prefill(self, rows: Sequence[Row]) -> tuple[BatchState, torch.Tensor]:
        self._before("prefill", rows)
        return self._inner.prefill(rows)

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        self._before("merge", b.rows)
        return self._inner.merge(a, b)

    def step(self, state: BatchState, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        self._before("step", state.rows)
        return self._inner.step(state, tokens)

    def select(self, state: BatchState, keep: list[int]) -> BatchState:
        return self._inner.select(state, keep)

    def release(self, state: BatchState) -> None:
        self._inner.release(state)

    @property
    def _inner(self) -> ModelRunner:
        assert self.inner is not None, "the engine was not built with this wrapper"
        return self.inner

    def _before(self, stage: str, rows: Sequence[Row]) -> None:
        fault = self.fault
        if fault is not None:
            fault(stage, list(rows))
