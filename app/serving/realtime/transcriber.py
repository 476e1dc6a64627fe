"""Committed utterances of one session -> transcription events, in commit order.

Each utterance is prepared and queued in the engine the moment it is committed, through the same
serving path (and so the same queue and batcher) as an HTTP transcription, so utterances of many
sessions decode as rows of the same batches. One task per session then streams their text out in
order: `.delta` events as tokens arrive, `.completed` (the deltas joined, and usage) or `.failed`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from app.errors import InternalError, VoxtralError
from app.metrics import Metrics
from app.serving.logprobs import TokenScore
from app.serving.realtime.events import (
    ConnectionGone,
    Emit,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
)
from app.serving.transcription import TranscriptionRun, TranscriptionServing
from app.serving.transcripts import Transcript, TranscriptionOptions

log = logging.getLogger(__name__)


@dataclass
class Utterance:
    item_id: str
    started: asyncio.Task[TranscriptionRun]
    stopped_at: float
    """Loop time of speech_stopped (or of the commit): where turn latency is measured from."""


class Transcriber:
    def __init__(self, transcriptions: TranscriptionServing, emit: Emit, metrics: Metrics) -> None:
        self.transcriptions, self.emit, self.metrics = transcriptions, emit, metrics
        self._pending: asyncio.Queue[Utterance | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._deliver())
        self.unanswered = 0
        """Utterances committed and not yet answered: a session waiting for them is not idle."""

    def add(self, item_id: str, audio: np.ndarray, options: TranscriptionOptions) -> None:
        started = asyncio.create_task(self._start(audio, options))
        self.unanswered += 1
        self._pending.put_nowait(Utterance(item_id, started, asyncio.get_running_loop().time()))

    async def _start(self, audio: np.ndarray, options: TranscriptionOptions) -> TranscriptionRun:
        # A session keeps no request record: its utterances are counted by the realtime metrics instead.
        return await self.transcriptions.utterance(audio, options)

    async def finish(self) -> None:
        """Deliver every utterance committed so far, then stop."""
        self._pending.put_nowait(None)
        await self._task

    def cancel(self) -> None:
        """The client is gone: stop decoding for it."""
        self._task.cancel()
        while not self._pending.empty():
            utterance = self._pending.get_nowait()
            if utterance is not None:
                utterance.started.add_done_callback(_cancel_run)

    async def _deliver(self) -> None:
        while (utterance := await self._pending.get()) is not None:
            try:
                await self._stream(utterance)
                self.unanswered -= 1
            except ConnectionGone:
                utterance.started.add_done_callback(_cancel_run)
                return
            except VoxtralError as exc:
                await self._fail(utterance, exc)
            except asyncio.CancelledError:
                utterance.started.add_done_callback(_cancel_run)
                raise
            except Exception:
                log.exception("realtime transcription failed")
                await self._fail(utterance, InternalError("The server had an internal error while transcribing."))

    async def _stream(self, utterance: Utterance) -> None:
        run = await utterance.started
        item = utterance.item_id
        text, scores = "", list[TokenScore]()
        async for piece in run.deltas():
            if isinstance(piece, Transcript):
                logprobs = scores if run.options.include_logprobs else None
                await self.emit(TranscriptionCompleted(item, text, piece, logprobs))
                self.metrics.realtime_utterances.labels("completed").inc()
                self.metrics.realtime_turn_latency.observe(asyncio.get_running_loop().time() - utterance.stopped_at)
                continue
            scores += piece.logprobs or []
            if piece.text or piece.logprobs:
                text += piece.text
                await self.emit(TranscriptionDelta(item, piece.text, piece.logprobs))

    async def _fail(self, utterance: Utterance, exc: VoxtralError) -> None:
        self.unanswered -= 1
        self.metrics.realtime_utterances.labels("failed").inc()
        await self.emit(TranscriptionFailed(utterance.item_id, exc))


def _cancel_run(task: asyncio.Task[TranscriptionRun]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().cancel()
