"""What a session tells its client, typed: the api layer renders each into one of OpenAI's server events.

Positions are milliseconds since the session's first audio; item ids name committed utterances.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.errors import VoxtralError
from app.serving.logprobs import TokenScore
from app.serving.realtime.config import SessionConfig
from app.serving.transcripts import Transcript


def new_id(prefix: str) -> str:
    """OpenAI's id shape: `sess_...`, `item_...`, `event_...`."""
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


class ConnectionGone(Exception):
    """Raised by an `Emit` whose client left: events have nowhere to go."""


@dataclass(frozen=True)
class SessionCreated:
    session_id: str
    config: SessionConfig
    expires_at: int
    """Unix time at which --realtime-max-session-s ends the session."""


@dataclass(frozen=True)
class SessionUpdated:
    session_id: str
    config: SessionConfig
    expires_at: int


@dataclass(frozen=True)
class SpeechStarted:
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class Committed:
    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True)
class Cleared:
    pass


@dataclass(frozen=True)
class TranscriptionDelta:
    """Text of an utterance as it decodes (logprobs: None unless the session asked for them)."""

    item_id: str
    delta: str
    logprobs: list[TokenScore] | None


@dataclass(frozen=True)
class TranscriptionCompleted:
    """`text`: the deltas joined; `logprobs`: all of theirs (None unless asked for)."""

    item_id: str
    text: str
    transcript: Transcript
    logprobs: list[TokenScore] | None


@dataclass(frozen=True)
class TranscriptionFailed:
    item_id: str
    error: VoxtralError


@dataclass(frozen=True)
class Error:
    """A command refused (or a bug met while handling it): the session goes on. `event_id`: the command's."""

    error: VoxtralError
    event_id: str | None = None


Event = (
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | Committed
    | Cleared
    | TranscriptionDelta
    | TranscriptionCompleted
    | TranscriptionFailed
    | Error
)
Emit = Callable[[Event], Awaitable[None]]
"""Hands an event to the client: waits while the client is slow, raises ConnectionGone once it left."""
