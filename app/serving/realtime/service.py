"""Realtime sessions of one app: admission (the model, the session limit) and what the sessions share.

The speech detector and large appends run in the serving layer's prep threads; utterances go through
the same transcription path (and so the same engine queue and batches) as HTTP transcriptions.
"""

from __future__ import annotations

from app.config import Settings
from app.errors import TooManySessions
from app.metrics import Metrics
from app.refusals import Refusals
from app.serving.prep import Prep
from app.serving.realtime.detector import SharedDetector, SharedTurnEnd
from app.serving.realtime.events import Emit
from app.serving.realtime.session import Session, Shared
from app.serving.realtime.streams import StreamLoop
from app.serving.transcription import TranscriptionServing


class Slots:
    """Sessions open at once, against `realtime_max_sessions`. Touched only on the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open = limit, 0


class RealtimeServing:
    def __init__(
        self,
        prep: Prep,
        transcriptions: TranscriptionServing | None,
        settings: Settings,
        metrics: Metrics,
        streams: StreamLoop | None = None,
    ) -> None:
        """`streams`: a Voxtral Realtime model's ticking loop (sessions then stream, and `transcriptions` is
        None); None: a Voxtral model, whose sessions transcribe each turn whole through `transcriptions`."""
        self.prep, self.metrics = prep, metrics
        limit = settings.realtime_max_sessions
        self.slots = Slots(limit if streams is None else min(limit, streams.max_streams))
        """A streaming model's sessions are at most its streams: one more would be admitted only to have every
        utterance refused while its audio piles up."""
        detector = SharedDetector(prep)
        self.shared = Shared(
            prep=prep,
            detector=detector,
            transcriptions=transcriptions,
            metrics=metrics,
            model=settings.model_id,
            max_utterance_s=settings.realtime_max_utterance_s,
            max_pending_utterances=settings.realtime_max_pending_utterances,
            refusals=Refusals(metrics),
            max_buffer_s=settings.realtime_max_buffer_s,
            turn_end=SharedTurnEnd(prep),
            streams=streams,
            blank_speech_s=settings.realtime_blank_speech_s,
            max_session_s=settings.realtime_max_session_s,
        )

    def admit(self, model: str | None) -> None:
        """Take a slot for a new session, or raise (unknown model, every slot taken); `leave` gives it back."""
        self.prep.check_model(model)
        if self.slots.open >= self.slots.limit:
            streams = "" if self.shared.streams is None else " (one per realtime stream it decodes)"
            raise TooManySessions(
                f"This server holds at most {self.slots.limit} realtime sessions at once{streams}; retry later."
            )
        self.slots.open += 1
        self.metrics.realtime_sessions.inc()

    def leave(self) -> None:
        self.slots.open -= 1
        self.metrics.realtime_sessions.dec()

    def session(self, emit: Emit, client: str = "") -> Session:
        """A new session of an admitted client (`client`: its opaque key, whose share of the queue the session
        takes from); its events go to `emit`."""
        return Session(self.shared, emit, client)
