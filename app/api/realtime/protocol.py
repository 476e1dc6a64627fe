"""The wire: client events parsed into pydantic models (unknown fields ignored), server events built as
dicts in the shapes of OpenAI's GA realtime schemas, and the session's effective configuration."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidRequest, UnsupportedFeature, VoxtralError

AudioFormat = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
LOGPROBS = "item.input_audio_transcription.logprobs"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FormatIn(_Wire):
    type: AudioFormat
    rate: Literal[24000] | None = None


class TranscriptionIn(_Wire):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class TurnDetectionIn(_Wire):
    type: Literal["server_vad"]
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(None, ge=32, le=10_000)


class InputIn(_Wire):
    format: FormatIn | None = None
    transcription: TranscriptionIn | None = None
    turn_detection: TurnDetectionIn | None = None
    noise_reduction: dict[str, Any] | None = None


class AudioIn(_Wire):
    input: InputIn | None = None


class SessionIn(_Wire):
    type: str
    audio: AudioIn | None = None
    include: list[str] | None = None


class ClientEvent(_Wire):
    type: str
    event_id: str | None = Field(None, max_length=512)


class SessionUpdate(ClientEvent):
    session: SessionIn


class Append(ClientEvent):
    audio: str


EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": SessionUpdate,
    "input_audio_buffer.append": Append,
    "input_audio_buffer.commit": ClientEvent,
    "input_audio_buffer.clear": ClientEvent,
}


class EventError(InvalidRequest):
    """A client event the session refuses: answered with an `error` event naming it; the session goes on."""

    def __init__(self, message: str, *, event_id: str | None, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code or "invalid_value")
        self.event_id = event_id


def parse(data: dict[str, Any]) -> ClientEvent:
    """The typed client event, or EventError (unknown type, missing or wrong fields)."""
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    model = EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise EventError(
            f"Invalid value: {kind!r}. Supported values are: {', '.join(EVENTS)} (this is a transcription session).",
            event_id=event_id,
            param="type",
            code="invalid_value" if kind is not None else "missing_required_parameter",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise EventError(f"Invalid {kind} event: {where}: {error['msg']}", event_id=event_id, param=where) from None


@dataclass(frozen=True)
class ServerVad:
    """OpenAI's server_vad, with OpenAI's defaults; see `app.api.realtime.turns` for how each maps to Silero."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SessionConfig:
    """The session's effective configuration, as session.created / session.updated report it."""

    model: str
    format: AudioFormat = "audio/pcm"
    language: str | None = None
    prompt: str | None = None
    turn_detection: ServerVad | None = field(default_factory=ServerVad)
    logprobs: bool = False
    """include: ["item.input_audio_transcription.logprobs"]: deltas and completions carry their tokens'."""

    def updated(self, session: SessionIn, check: Any) -> SessionConfig:
        """This config with the fields `session` sets (absent fields keep their value; null turns VAD off).
        `check(model, language)` validates the transcription settings (raises VoxtralError)."""
        if session.type != "transcription":
            raise UnsupportedFeature(
                f"session.type {session.type!r} is not supported: this server only runs transcription sessions.",
                param="session.type",
            )
        if session.include and any(item != LOGPROBS for item in session.include):
            raise InvalidRequest(f"session.include may only hold {LOGPROBS!r}.", param="session.include")
        audio = session.audio.input if session.audio and session.audio.input else InputIn()
        new = self._with_input(audio, check)
        return new if session.include is None else replace(new, logprobs=LOGPROBS in session.include)

    def _with_input(self, audio: InputIn, check: Any) -> SessionConfig:
        new = self
        if audio.format is not None:
            new = replace(new, format=audio.format.type)
        if audio.transcription is not None:
            t = audio.transcription
            new = replace(new, model=t.model or new.model, language=check(t.model, t.language), prompt=t.prompt)
        if "turn_detection" in audio.model_fields_set:
            vad = audio.turn_detection
            new = replace(new, turn_detection=None if vad is None else _server_vad(vad))
        return new

    def wire(self, session_id: str) -> dict[str, Any]:
        """RealtimeTranscriptionSessionCreateResponseGA (no `noise_reduction`: this server applies none)."""
        transcription = {"model": self.model, "language": self.language, "prompt": self.prompt}
        fmt: dict[str, Any] = {"type": self.format} | ({"rate": 24000} if self.format == "audio/pcm" else {})
        vad = None if self.turn_detection is None else {"type": "server_vad", **asdict(self.turn_detection)}
        return {
            "type": "transcription",
            "id": session_id,
            "object": "realtime.transcription_session",
            "expires_at": int(time.time()) + 3600,
            "include": [LOGPROBS] if self.logprobs else [],
            "audio": {
                "input": {
                    "format": fmt,
                    "transcription": {k: v for k, v in transcription.items() if v is not None},
                    "turn_detection": vad,
                }
            },
        }


def _server_vad(vad: TurnDetectionIn) -> ServerVad:
    given = {k: v for k, v in vad.model_dump(exclude={"type"}).items() if v is not None}
    return replace(ServerVad(), **given)


# -- server events ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": new_id("event"), "type": kind, **fields}


def error_event(exc: VoxtralError, event_id: str | None = None) -> dict[str, Any]:
    """RealtimeServerEventError: OpenAI's error object plus the client event it answers."""
    return event("error", error={**exc.error_object(), "event_id": event_id})


def failed_event(item_id: str, exc: VoxtralError) -> dict[str, Any]:
    """conversation.item.input_audio_transcription.failed (its error fields are strings, never null)."""
    return event(
        "conversation.item.input_audio_transcription.failed",
        item_id=item_id,
        content_index=0,
        error={k: v for k, v in exc.error_object().items() if v is not None},
    )
