"""The wire: client events parsed into pydantic models (unknown fields ignored) and then into the session's
typed commands; the session's typed events rendered as dicts in the shapes of OpenAI's GA realtime schemas.

Every string a session keeps and echoes (in each `session.updated`, or in an error message) has a length
limit, so a client cannot make the server hold or send back more than a few KB per event: OpenAI's where its
spec states one (`event_id`: 512), ours otherwise (below). One over its limit is refused with an `error` event
whose `param` names it (code `string_above_max_length`), and the session keeps its configuration.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.render import logprob_entries
from app.api.transcripts import usage
from app.audio_formats import AudioFormat
from app.denoise import NoiseReduction
from app.errors import InvalidRequest, UnsupportedFeature, VoxtralError
from app.serving.realtime import commands as cmd
from app.serving.realtime import events as ev
from app.serving.realtime.config import (
    KEEP,
    Eagerness,
    SemanticVad,
    ServerVad,
    SessionConfig,
    TranscriptionSettings,
    TurnDetection,
    UpdateSettings,
)

LOGPROBS = "item.input_audio_transcription.logprobs"
_DELAY_FIELD = {False: "delay", True: "delay_ms"}
"""How a session echoes its delay: OpenAI's name as `delay`, milliseconds as our `delay_ms`."""
_DELTA = "conversation.item.input_audio_transcription.delta"
MAX_PROMPT_CHARS = 4096
"""`transcription.prompt` (OpenAI states no limit; Voxtral's transcription takes no prompt: it is only echoed)."""
MAX_MODEL_CHARS = 256
"""`transcription.model`: a Hugging Face id or a served alias."""
MAX_LANGUAGE_CHARS = 32
"""`transcription.language`: an ISO-639-1 code, with room for spaces and case."""
MAX_TYPE_CHARS = 64
"""`session.type`, and the most of an unknown event `type` an error message quotes."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FormatIn(_Wire):
    type: AudioFormat
    rate: Literal[24000] | None = None


class TranscriptionIn(_Wire):
    """`delay`: OpenAI's latency knob; `delay_ms` (an extension, over `delay` when both are given): the delay in
    milliseconds, a multiple of 80 from 80 to 2,400 (Voxtral Realtime's token-frames)."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    language: str | None = Field(None, max_length=MAX_LANGUAGE_CHARS)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    delay: Literal["minimal", "low", "medium", "high", "xhigh"] | None = None
    delay_ms: int | None = None


class ServerVadIn(_Wire):
    """`create_response`, `interrupt_response`, `idle_timeout_ms` concern responses, which a transcription
    session never creates: accepted and ignored, as any field this server does not know."""

    type: Literal["server_vad"]
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(None, ge=32, le=10_000)


class SemanticVadIn(_Wire):
    type: Literal["semantic_vad"]
    eagerness: Eagerness | None = None


class NoiseReductionIn(_Wire):
    type: NoiseReduction


class InputIn(_Wire):
    format: FormatIn | None = None
    transcription: TranscriptionIn | None = None
    turn_detection: Annotated[ServerVadIn | SemanticVadIn, Field(discriminator="type")] | None = None
    noise_reduction: NoiseReductionIn | None = None


class AudioIn(_Wire):
    input: InputIn | None = None


class SessionIn(_Wire):
    type: str = Field(max_length=MAX_TYPE_CHARS)
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


def event_id(data: dict[str, Any]) -> str | None:
    """The client event's `event_id`, which an error event answering it names (None if not a string)."""
    value = data.get("event_id")
    return value if isinstance(value, str) else None


def parse(data: dict[str, Any]) -> ClientEvent:
    """The typed client event, or InvalidRequest (unknown type, missing or wrong fields)."""
    kind = data.get("type")
    model = EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise InvalidRequest(
            f"Invalid value: {_quoted(kind)}. Supported values are: {', '.join(EVENTS)} (this is a transcription "
            "session).",
            param="type",
            code="invalid_value" if kind is not None else "missing_required_parameter",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        code = "string_above_max_length" if error["type"] == "string_too_long" else "invalid_value"
        raise InvalidRequest(f"Invalid {kind} event: {where}: {error['msg']}", param=where, code=code) from None


def _quoted(value: object) -> str:
    """`value` as an error message quotes it: its repr, cut to MAX_TYPE_CHARS (the message is sent back)."""
    shown = repr(value)
    return shown if len(shown) <= MAX_TYPE_CHARS else shown[: MAX_TYPE_CHARS - 3] + "..."


def command(message: ClientEvent) -> cmd.Command:
    """The session's typed command for a parsed client event (UnsupportedFeature / InvalidRequest for a
    session.update it cannot take)."""
    if isinstance(message, SessionUpdate):
        return cmd.UpdateSession(message.event_id, _settings(message.session))
    if isinstance(message, Append):
        return cmd.AppendAudio(message.event_id, message.audio)
    if message.type == "input_audio_buffer.commit":
        return cmd.Commit(message.event_id)
    return cmd.Clear(message.event_id)


def _settings(session: SessionIn) -> UpdateSettings:
    """The settings `session` names (absent fields keep their value; a null turn_detection turns VAD off)."""
    if session.type != "transcription":
        raise UnsupportedFeature(
            f"session.type {session.type!r} is not supported: this server only runs transcription sessions.",
            param="session.type",
        )
    if session.include and any(item != LOGPROBS for item in session.include):
        raise InvalidRequest(f"session.include may only hold {LOGPROBS!r}.", param="session.include")
    audio = session.audio.input if session.audio and session.audio.input else InputIn()
    t = audio.transcription
    vad = audio.turn_detection
    return UpdateSettings(
        format=KEEP if audio.format is None else audio.format.type,
        transcription=KEEP if t is None else _transcription(t),
        turn_detection=KEEP if "turn_detection" not in audio.model_fields_set else _turn_detection(vad),
        logprobs=KEEP if session.include is None else LOGPROBS in session.include,
        noise_reduction=KEEP if "noise_reduction" not in audio.model_fields_set else _noise(audio.noise_reduction),
    )


def _transcription(t: TranscriptionIn) -> TranscriptionSettings:
    return TranscriptionSettings(t.model, t.language, t.prompt, t.delay_ms if t.delay_ms is not None else t.delay)


def _noise(given: NoiseReductionIn | None) -> NoiseReduction | None:
    return None if given is None else given.type


def _turn_detection(vad: ServerVadIn | SemanticVadIn | None) -> TurnDetection | None:
    """The turn detection `vad` names, its fields left out at OpenAI's defaults (None: manual commits)."""
    if vad is None:
        return None
    given = {k: v for k, v in vad.model_dump(exclude={"type"}).items() if v is not None}
    return replace(SemanticVad() if isinstance(vad, SemanticVadIn) else ServerVad(), **given)


# -- server events ---------------------------------------------------------------------------------
def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": ev.new_id("event"), "type": kind, **fields}


def error_event(exc: VoxtralError, event_id: str | None = None) -> dict[str, Any]:
    """RealtimeServerEventError: OpenAI's error object plus the client event it answers."""
    return event("error", error={**exc.error_object(), "event_id": event_id})


def render(e: ev.Event) -> dict[str, Any]:
    """The server event for one of the session's typed events."""
    match e:
        case ev.SessionCreated() | ev.SessionUpdated():
            kind = "session.created" if isinstance(e, ev.SessionCreated) else "session.updated"
            return event(kind, session=session_object(e.config, e.session_id, e.expires_at))
        case ev.SpeechStarted():
            return event("input_audio_buffer.speech_started", audio_start_ms=e.audio_start_ms, item_id=e.item_id)
        case ev.SpeechStopped():
            return event("input_audio_buffer.speech_stopped", audio_end_ms=e.audio_end_ms, item_id=e.item_id)
        case ev.Committed():
            return event("input_audio_buffer.committed", previous_item_id=e.previous_item_id, item_id=e.item_id)
        case ev.Cleared():
            return event("input_audio_buffer.cleared")
        case ev.TranscriptionDelta():
            return _delta(e)
        case ev.TranscriptionCompleted():
            return _completed(e)
        case ev.TranscriptionFailed():
            return _failed(e.item_id, e.error)
        case ev.Error():
            return error_event(e.error, e.event_id)


def session_object(config: SessionConfig, session_id: str, expires_at: int) -> dict[str, Any]:
    """RealtimeTranscriptionSessionCreateResponseGA (`noise_reduction` only when on: its schema is not
    nullable; `delay` only when set: its enum is not nullable either)."""
    transcription: dict[str, Any] = {"model": config.model, "language": config.language, "prompt": config.prompt}
    transcription[_DELAY_FIELD[isinstance(config.delay, int)]] = config.delay
    fmt: dict[str, Any] = {"type": config.format} | ({"rate": 24000} if config.format == "audio/pcm" else {})
    vad = _vad_object(config.turn_detection)
    noise = {} if config.noise_reduction is None else {"noise_reduction": {"type": config.noise_reduction}}
    return {
        "type": "transcription",
        "id": session_id,
        "object": "realtime.transcription_session",
        "expires_at": expires_at,
        "include": [LOGPROBS] if config.logprobs else [],
        "audio": {
            "input": {
                "format": fmt,
                "transcription": {k: v for k, v in transcription.items() if v is not None},
                "turn_detection": vad,
                **noise,
            }
        },
    }


def _vad_object(vad: TurnDetection | None) -> dict[str, Any] | None:
    if vad is None:
        return None
    return {"type": "semantic_vad" if isinstance(vad, SemanticVad) else "server_vad", **asdict(vad)}


def _delta(e: ev.TranscriptionDelta) -> dict[str, Any]:
    fields = {"logprobs": logprob_entries(e.logprobs)} if e.logprobs is not None else {}
    return event(_DELTA, item_id=e.item_id, content_index=0, delta=e.delta, **fields)


def _completed(e: ev.TranscriptionCompleted) -> dict[str, Any]:
    fields: dict[str, Any] = {"item_id": e.item_id, "content_index": 0, "transcript": e.text}
    if e.logprobs is not None:
        fields["logprobs"] = logprob_entries(e.logprobs)
    if e.transcript.language:
        fields["languages"] = [{"code": e.transcript.language}]
    fields["usage"] = usage(e.transcript)
    return event("conversation.item.input_audio_transcription.completed", **fields)


def _failed(item_id: str, exc: VoxtralError) -> dict[str, Any]:
    """conversation.item.input_audio_transcription.failed (its error fields are strings, never null)."""
    return event(
        "conversation.item.input_audio_transcription.failed",
        item_id=item_id,
        content_index=0,
        error={k: v for k, v in exc.error_object().items() if v is not None},
    )
