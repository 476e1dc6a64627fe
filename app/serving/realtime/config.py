"""A session's effective configuration, and the typed `session.update` that changes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Literal

from app.audio_formats import AudioFormat
from app.denoise import NoiseReduction


@dataclass(frozen=True)
class ServerVad:
    """OpenAI's server_vad, with OpenAI's defaults; see `app.serving.realtime.turns` for how each maps to Silero."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


Eagerness = Literal["low", "medium", "high", "auto"]
MAX_WAIT_S: dict[str, float] = {"low": 8.0, "medium": 4.0, "high": 2.0, "auto": 4.0}
"""OpenAI's most waiting after speech stops, per eagerness, before a turn ends whatever the model says."""


@dataclass(frozen=True)
class SemanticVad:
    """OpenAI's semantic_vad: Silero hears the speech, Smart Turn decides whether a pause ends the turn
    (`app.serving.realtime.turns.SemanticTurns`); `eagerness` bounds how long a pause it judged
    unfinished may last."""

    eagerness: Eagerness = "auto"
    prefix_padding_ms = 300
    """Not a setting of semantic_vad: server_vad's default, so both cut utterances alike."""

    @property
    def max_wait_s(self) -> float:
        return MAX_WAIT_S[self.eagerness]


TurnDetection = ServerVad | SemanticVad


@dataclass(frozen=True)
class TranscriptionSettings:
    """`session.audio.input.transcription` as given: a missing model keeps the session's."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    delay: str | int | None = None
    """OpenAI's `delay` (minimal..xhigh) or our `delay_ms` extension: how far a Voxtral Realtime model's text
    trails the speaker (None: the model's default); other models ignore it."""


class Keep(Enum):
    """A field `session.update` did not name: the session keeps its value."""

    KEEP = "keep"


KEEP = Keep.KEEP
Check = Callable[[str | None, str | None], str | None]
"""`check(model, language)`: the language to use, or a VoxtralError for an unknown model or language."""


@dataclass(frozen=True)
class SessionConfig:
    """The session's effective configuration, as session.created / session.updated report it."""

    model: str
    format: AudioFormat = "audio/pcm"
    language: str | None = None
    prompt: str | None = None
    turn_detection: TurnDetection | None = field(default_factory=ServerVad)
    logprobs: bool = False
    """include: ["item.input_audio_transcription.logprobs"]: deltas and completions carry their tokens'."""
    noise_reduction: NoiseReduction | None = None
    """The denoiser the session's audio goes through before VAD and the model (`app.denoise`), or none."""
    delay: str | int | None = None
    """`TranscriptionSettings.delay`, as given."""

    def updated(self, update: UpdateSettings, check: Check) -> SessionConfig:
        """This config with the fields `update` names (None turn detection: manual commits)."""
        new = self
        if not isinstance(update.format, Keep):
            new = replace(new, format=update.format)
        if not isinstance(update.transcription, Keep):
            t = update.transcription
            language = check(t.model, t.language)
            new = replace(new, model=t.model or new.model, language=language, prompt=t.prompt, delay=t.delay)
        if not isinstance(update.turn_detection, Keep):
            new = replace(new, turn_detection=update.turn_detection)
        if not isinstance(update.logprobs, Keep):
            new = replace(new, logprobs=update.logprobs)
        if not isinstance(update.noise_reduction, Keep):
            new = replace(new, noise_reduction=update.noise_reduction)
        return new


@dataclass(frozen=True)
class UpdateSettings:
    """The settings a `session.update` names; each field left at KEEP keeps the session's value."""

    format: AudioFormat | Keep = KEEP
    transcription: TranscriptionSettings | Keep = KEEP
    turn_detection: TurnDetection | None | Keep = KEEP
    logprobs: bool | Keep = KEEP
    noise_reduction: NoiseReduction | None | Keep = KEEP
