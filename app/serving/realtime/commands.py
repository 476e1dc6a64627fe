"""What a client asks of a session, typed: the api layer parses the wire into these.

Each carries the client's `event_id`, so an error event can name the event it answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.serving.realtime.config import UpdateSettings


@dataclass(frozen=True)
class UpdateSession:
    """session.update: change the settings `settings` names."""

    event_id: str | None
    settings: UpdateSettings


@dataclass(frozen=True)
class AppendAudio:
    """input_audio_buffer.append: `audio` is base64 in the session's format (decoded by the session, since a
    large append is decoded in a prep thread)."""

    event_id: str | None
    audio: str


@dataclass(frozen=True)
class Commit:
    """input_audio_buffer.commit: the buffered audio (or the utterance in progress) becomes an utterance."""

    event_id: str | None


@dataclass(frozen=True)
class Clear:
    """input_audio_buffer.clear: forget the uncommitted audio."""

    event_id: str | None


Command = UpdateSession | AppendAudio | Commit | Clear
