"""One speech detector for every realtime session of the app: the windows that sessions' appends complete
while a batch runs are gathered into the next batch (`app.vad.push_many`), one batch at a time in a prep
thread. Batched sessions cost a fraction of one call each (docs/PERF.md#audio-and-vad), and the detector
holds at most one prep thread, leaving the others to prepare transcriptions."""

from __future__ import annotations

import asyncio

import numpy as np

from app import vad
from app.serving.prep import Prep


class SharedDetector:
    def __init__(self, prep: Prep) -> None:
        self.prep = prep
        self._waiting: list[tuple[vad.VadStream, np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def push(self, stream: vad.VadStream, samples: np.ndarray) -> np.ndarray:
        """`stream.push(samples)`, batched with the other sessions' (a stream must not push twice at once)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((stream, samples, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                results = await self.prep.run(vad.push_many, [b[0] for b in batch], [b[1] for b in batch])
            except Exception as exc:  # every caller hears of it; the next batch still runs
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), probs in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(probs)
