"""Committed utterances of one session -> transcription events, in commit order.

Each utterance is prepared and queued in the engine the moment it is committed, through the same
serving path (and so the same queue and batcher) as an HTTP transcription, so utterances of many
sessions decode as rows of the same batches. One task per session then streams their text out in
order: `.delta` events as tokens arrive, `.completed` (the deltas joined, and usage) or `.failed`.

A session holds at most `max_pending` utterances in the engine: a commit past that is not queued, and is
answered in its turn with `.failed` (`rate_limit_exceeded`), so a session that commits faster than it is
answered takes no more of the queue or the batch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from app.errors import InternalError, RateLimited, VoxtralError
from app.metrics import Metrics
from app.refusals import Refusals
from app.serving.logprobs import TokenScore
from app.serving.realtime.config import SessionConfig
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


@dataclass(frozen=True)
class Share:
    """A session's share of the engine: its owner key, and how many utterances it may have pending."""

    owner: str
    max_pending: int
    refusals: Refusals


@dataclass
class Utterance:
    item_id: str
    started: asyncio.Task[TranscriptionRun] | None
    """None: refused (`refused`), never queued."""
    stopped_at: float
    """Loop time of speech_stopped (or of the commit): where turn latency is measured from."""
    refused: VoxtralError | None = None

    def stop(self) -> None:
        """Nobody will read it: cancel its run once it is queued."""
        if self.started is not None:
            self.started.add_done_callback(_cancel_run)


class Transcriber:
    """A `Sink` that transcribes each committed utterance whole (the session's buffer holds it until then)."""

    streaming = False

    def __init__(self, transcriptions: TranscriptionServing, emit: Emit, metrics: Metrics, share: Share) -> None:
        self.transcriptions, self.emit, self.metrics, self.share = transcriptions, emit, metrics, share
        self._pending: asyncio.Queue[Utterance | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._deliver())
        """None once released: a task that ended with an error holds its frames, which hold this transcriber."""
        self.unanswered = 0
        """Utterances committed and not yet answered: a session waiting for them is not idle."""
        self.queued = 0
        """Of those, the ones sent to the engine (not refused): held against `share.max_pending`."""

    def accepts(self, config: SessionConfig) -> None:
        """Every configuration the session accepts (a delay has no meaning here)."""

    def begin(self, item_id: str, config: SessionConfig, speech: bool) -> None:
        """Nothing to open: the utterance is sent whole at `commit`."""

    def feed(self, samples: np.ndarray) -> None:
        """Never called (not streaming)."""

    def drop(self) -> None:
        """Nothing was sent for the open utterance."""

    def commit(self, item_id: str, audio: np.ndarray, options: TranscriptionOptions) -> None:
        now = asyncio.get_running_loop().time()
        self.unanswered += 1
        if self.queued >= self.share.max_pending:
            return self._pending.put_nowait(Utterance(item_id, None, now, self._refuse()))
        self.queued += 1
        self._pending.put_nowait(Utterance(item_id, asyncio.create_task(self._start(audio, options)), now))

    def _refuse(self) -> RateLimited:
        limit = self.share.max_pending
        error = RateLimited(
            f"This session already has {limit} utterances waiting for their transcription (at most {limit}); "
            "this one was not transcribed."
        )
        self.share.refusals.note("session_pending", self.share.owner, error.message)
        return error

    async def _start(self, audio: np.ndarray, options: TranscriptionOptions) -> TranscriptionRun:
        # A session keeps no request record: its utterances are counted by the realtime metrics instead.
        return await self.transcriptions.utterance(audio, options, self.share.owner)

    async def finish(self) -> None:
        """Deliver every utterance committed so far, then stop."""
        self._pending.put_nowait(None)
        if self._task is not None:
            await self._task

    def release(self) -> None:
        """The session is over (after `finish` or `cancel`): let go of the connection (`emit`), which holds
        the session, and of the delivering task. A cancelled task holds its error, whose traceback holds the
        task's frames: this transcriber, and the run of the utterance it was streaming (its tokenized audio, 2
        MB a 30 s window). Dropped here, they are freed at once rather than at the collector's next full pass."""
        self.emit = _gone
        self._task = None

    def cancel(self) -> None:
        """The client is gone: stop decoding for it."""
        if self._task is not None:
            self._task.cancel()
        while not self._pending.empty():
            utterance = self._pending.get_nowait()
            if utterance is not None:
                utterance.stop()

    async def _deliver(self) -> None:
        while (utterance := await self._pending.get()) is not None:
            try:
                if utterance.refused is not None:  # answered, not raised: a raised error's traceback would hold
                    await self._fail(utterance, utterance.refused)  # the utterance, and so itself, in a cycle
                    continue
                await self._stream(utterance)
                self.unanswered -= 1
            except ConnectionGone:
                utterance.stop()
                return
            except VoxtralError as exc:
                await self._fail(utterance, exc)
            except asyncio.CancelledError:
                utterance.stop()
                raise
            except Exception:
                log.exception("realtime transcription failed")
                await self._fail(utterance, InternalError("The server had an internal error while transcribing."))
            finally:
                self.queued -= utterance.started is not None

    async def _stream(self, utterance: Utterance) -> None:
        assert utterance.started is not None
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


async def _gone(event: object) -> None:
    raise ConnectionGone


def _cancel_run(task: asyncio.Task[TranscriptionRun]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().cancel()
