"""A session's streamed utterances (Voxtral Realtime): each utterance is a `Stream` fed while audio arrives;
its tokens become `.delta` events as ticks emit them, and `.completed` (the deltas joined) follows the final
token of the flush a commit starts. One task per session delivers the utterances in the order they began,
so an utterance's events never interleave with the next one's.

The blank-token rut guard: a stream of speech (the session's VAD heard it) that emits no text over
`blank_s` of its audio is logged once and counted (`voxtral_realtime_blank_streams_total`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np

from app.audio import SAMPLE_RATE
from app.errors import InternalError, VoxtralError
from app.metrics import Metrics
from app.model.realtime.engine import StreamStep
from app.model.realtime.timing import FRAME_MS
from app.serving.realtime.config import SessionConfig
from app.serving.realtime.events import (
    ConnectionGone,
    Emit,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
)
from app.serving.realtime.streams import Stream, StreamLoop
from app.serving.transcripts import PieceResult, Transcript, TranscriptionOptions

log = logging.getLogger(__name__)


@dataclass
class Live:
    """One utterance's stream and what its events need."""

    item_id: str
    stream: Stream
    delay_frames: int
    speech: bool
    """The session's VAD heard this audio as speech: the blank-token guard watches it."""
    samples: int = 0
    committed_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    last_text_frame: int | None = None
    """Engine frame of the last token with text (None: none yet)."""
    blank_reported: bool = False


class Streamer:
    """A `Sink` over the ticking loop: one `Stream` per utterance, opened at `begin`, flushed at `commit`."""

    streaming = True

    def __init__(self, streams: StreamLoop, emit: Emit, metrics: Metrics, blank_s: float, session_id: str) -> None:
        self.streams, self.emit, self.metrics, self.blank_s, self.session_id = (
            streams,
            emit,
            metrics,
            blank_s,
            session_id,
        )
        self.current: Live | None = None
        """The utterance being fed (None between utterances)."""
        self.begun = 0
        """Utterances begun and not yet answered (completed, failed or dropped)."""
        self._pending: asyncio.Queue[Live | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._deliver())

    @property
    def unanswered(self) -> int:
        """Utterances committed and not yet answered; the one still being fed is not one (else a client that
        falls silent mid-utterance would never be idle)."""
        return self.begun - (self.current is not None)

    def accepts(self, config: SessionConfig) -> None:
        try:
            self.streams.check_delay(config.delay)
        except VoxtralError as exc:
            exc.param = "session.audio.input.transcription.delay"
            raise

    def begin(self, item_id: str, config: SessionConfig, speech: bool) -> None:
        """Open the next utterance's stream. InvalidRequest (bad delay), RateLimited (every stream taken)."""
        assert self.current is None, "the session drops or commits an utterance before it begins the next"
        stream, delay_frames = self.streams.open(config.delay)
        self.current = Live(item_id, stream, delay_frames, speech)
        self.begun += 1
        self._pending.put_nowait(self.current)

    def feed(self, samples: np.ndarray) -> None:
        if self.current is not None and samples.shape[0]:
            self.current.samples += samples.shape[0]
            self.current.stream.feed(samples)

    def commit(self, item_id: str, audio: np.ndarray, options: TranscriptionOptions) -> None:
        """Flush the current utterance (its audio went to `feed`): its `.completed` follows the final token."""
        if self.current is not None:
            self.current.committed_at = asyncio.get_running_loop().time()
            self.current.stream.flush()
            self.current = None

    def drop(self) -> None:
        """The current utterance is abandoned (no `.completed`): cleared, or too short to commit at a close."""
        if self.current is not None:
            self.current.stream.close()
            self.current = None

    async def finish(self) -> None:
        """Deliver every committed utterance, then stop (the session has dropped or committed the current one)."""
        self._pending.put_nowait(None)
        if self._task is not None:
            await self._task

    def cancel(self) -> None:
        """The client is gone: free every stream at once."""
        if self._task is not None:
            self._task.cancel()
        while not self._pending.empty():
            if (live := self._pending.get_nowait()) is not None:
                live.stream.close()
        if self.current is not None:
            self.current.stream.close()

    def release(self) -> None:
        self.cancel()
        self.emit = _gone
        self._task = None

    async def _deliver(self) -> None:
        while (live := await self._pending.get()) is not None:
            try:
                await self._stream(live)
            except ConnectionGone:
                return
            except VoxtralError as exc:
                await self._fail(live, exc)
            except Exception:
                log.exception("realtime session %s: streaming transcription failed", self.session_id)
                await self._fail(live, InternalError("The server had an internal error while transcribing."))
            finally:
                live.stream.close()
                self.begun -= 1

    async def _stream(self, live: Live) -> None:
        text = ""
        async for step in live.stream.steps():
            live.tokens.append(step.token)
            if step.text:
                text += step.text
                await self.emit(TranscriptionDelta(live.item_id, step.text, None))
            self._guard(live, step)
            if step.final:
                await self._completed(live, text)

    async def _completed(self, live: Live, text: str) -> None:
        seconds = live.samples / SAMPLE_RATE
        piece = PieceResult(0.0, seconds, text.strip(), live.tokens, 0)
        await self.emit(
            TranscriptionCompleted(live.item_id, text, Transcript(TranscriptionOptions(), seconds, [piece]), None)
        )
        self.metrics.realtime_utterances.labels("completed").inc()
        if live.committed_at is not None:
            self.metrics.realtime_turn_latency.observe(asyncio.get_running_loop().time() - live.committed_at)

    def _guard(self, live: Live, step: StreamStep) -> None:
        """Count a speech stream that says nothing over `blank_s` of its audio (`blank_run`), once."""
        if step.text.strip():
            live.last_text_frame = step.frame
            return
        if not live.speech or live.blank_reported:
            return
        run = blank_run(step.frame, live.delay_frames, live.samples // _FRAME_SAMPLES, live.last_text_frame)
        if run * FRAME_MS / 1000 >= self.blank_s:
            live.blank_reported = True
            self.metrics.realtime_blank_streams.inc()
            log.warning(
                "realtime session %s: item %s emitted no text over %g s of speech (blank-token rut)",
                self.session_id,
                live.item_id,
                self.blank_s,
            )

    async def _fail(self, live: Live, exc: VoxtralError) -> None:
        self.metrics.realtime_utterances.labels("failed").inc()
        await self.emit(TranscriptionFailed(live.item_id, exc))


_FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


def blank_run(frame: int, delay_frames: int, audio_frames: int, last_text_frame: int | None) -> int:
    """Frames of the utterance's audio without text up to the token at engine frame `frame` (0 when that token
    speaks for no audio). The token at `frame` speaks for audio frame `frame - delay_frames` (a stream's first
    token has frame == delay_frames: the delay itself is no audio); tokens past the `audio_frames` whole frames
    fed speak for the flush's padding. The run starts after the audio frame of the last token with text
    (`last_text_frame`, None: none yet). Pure."""
    audio = frame - delay_frames
    if audio < 0 or audio >= audio_frames:
        return 0
    start = 0 if last_text_frame is None else max(0, last_text_frame - delay_frames + 1)
    return max(0, audio - start + 1)


async def _gone(event: object) -> None:
    raise ConnectionGone
