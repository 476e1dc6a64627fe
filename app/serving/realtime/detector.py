"""The models every realtime session of the app shares, each batched across sessions: what sessions ask
while a batch runs is gathered into the next one, one batch at a time in a prep thread.

- `SharedDetector`: Silero's speech probabilities (`app.vad.push_many`). Batched sessions cost a fraction
  of one call each (docs/PERF.md#audio-and-vad).
- `SharedTurnEnd`: Smart Turn's P(turn complete) (`app.turn_end.probabilities`), asked by `semantic_vad`
  sessions when their speaker pauses.

Each holds at most one prep thread, leaving the others to prepare transcriptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from app import turn_end, vad
from app.serving.prep import Prep

A = TypeVar("A")
R = TypeVar("R")


class Batches(Generic[A, R]):
    """`await ask(x)`: `fn([x, ...])`'s answer for `x`, `fn` taking whatever was asked meanwhile."""

    def __init__(self, prep: Prep, fn: Callable[[list[A]], list[R]]) -> None:
        self.prep, self.fn = prep, fn
        self._waiting: list[tuple[A, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def ask(self, item: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                results = await self.prep.run(self.fn, [item for item, _ in batch])
            except Exception as exc:  # every caller hears of it; the next batch still runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def _push_many(asked: list[tuple[vad.VadStream, np.ndarray]]) -> list[np.ndarray]:
    return vad.push_many([stream for stream, _ in asked], [samples for _, samples in asked])


class SharedDetector:
    def __init__(self, prep: Prep) -> None:
        self.prep = prep
        self._batches: Batches[tuple[vad.VadStream, np.ndarray], np.ndarray] = Batches(prep, _push_many)

    async def push(self, stream: vad.VadStream, samples: np.ndarray) -> np.ndarray:
        """`stream.push(samples)`, batched with the other sessions' (a stream must not push twice at once)."""
        return await self._batches.ask((stream, samples))


class SharedTurnEnd:
    def __init__(self, prep: Prep) -> None:
        self._batches: Batches[np.ndarray, float] = Batches(prep, turn_end.probabilities)

    async def complete(self, audio: np.ndarray) -> float:
        """P(the turn is complete) for an utterance's audio up to the pause (only its last 8 s are heard)."""
        return await self._batches.ask(audio[-turn_end.SAMPLES :])
