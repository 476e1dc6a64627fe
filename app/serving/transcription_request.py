"""A transcription or translation request's form fields, read into `TranscriptionOptions` (400s here).

`chunking_strategy` unset transcribes the whole file as one Voxtral request; `auto` or a `server_vad`
object cuts it at silences into pieces of at most 30 s that run as rows of the same batch. srt, vtt and
verbose_json default to `auto`, because their segment times are those cuts: Voxtral emits no timestamps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.chunking import VadOptions
from app.errors import InvalidRequest, UnsupportedFeature
from app.serving.transcripts import Task, TranscriptionOptions, check_language

log = logging.getLogger(__name__)
FORMATS = ("json", "verbose_json", "text", "srt", "vtt")
TIMED_FORMATS = frozenset({"srt", "vtt", "verbose_json"})
STREAM_FORMATS = frozenset({"json", "text"})


class VadConfig(BaseModel):
    """OpenAI's `server_vad` chunking object (unknown keys refused, as OpenAI does)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["server_vad"]
    prefix_padding_ms: int = Field(300, ge=0, le=10_000)
    silence_duration_ms: int = Field(200, ge=20, le=10_000)
    threshold: float = Field(0.5, ge=0.0, le=1.0)


@dataclass(frozen=True)
class AudioForm:
    """The multipart fields both routes share."""

    model: str
    response_format: str
    temperature: float
    prompt: str | None = None
    language: str | None = None
    stream: bool = False
    chunking_strategy: Any = None
    """"auto", a JSON object as text, or the object itself (the SDK's `chunking_strategy[type]` fields)."""
    timestamp_granularities: tuple[str, ...] = ()
    include: tuple[str, ...] = ()


def options(form: AudioForm, task: Task) -> TranscriptionOptions:
    pieces = chunking(form)
    _check_format(form)
    if not 0.0 <= form.temperature <= 1.0:
        raise InvalidRequest("temperature must be between 0 and 1.", param="temperature")
    _check_granularities(form.timestamp_granularities)
    include_logprobs = "logprobs" in form.include
    if include_logprobs and form.response_format != "json":
        raise InvalidRequest("include[]=logprobs works with response_format json only.", param="include")
    if form.prompt and task == "transcribe":
        log.debug("prompt ignored: Voxtral's transcription format has no prompt")
    language = check_language(form.language) if task == "transcribe" else None
    scores = include_logprobs or form.response_format == "verbose_json"  # verbose_json: segments' avg_logprob
    return TranscriptionOptions(
        task, language, form.prompt, form.temperature, pieces, logprobs=scores, include_logprobs=include_logprobs
    )


def _check_format(form: AudioForm) -> None:
    if form.response_format not in FORMATS:
        raise UnsupportedFeature(
            f"response_format {form.response_format!r} is not supported; use one of {', '.join(FORMATS)}.",
            param="response_format",
        )
    if form.stream and form.response_format not in STREAM_FORMATS:
        raise UnsupportedFeature(
            f"stream=true works with response_format json or text, not {form.response_format}: "
            "the stream's events carry text only.",
            param="stream",
        )


def _check_granularities(granularities: tuple[str, ...]) -> None:
    for granularity in granularities:
        if granularity == "word":
            raise UnsupportedFeature(
                "Word timestamps are not supported: Voxtral emits no timestamps. Segment times (where the "
                "server cut the audio at silences) are: use timestamp_granularities[]=segment.",
                param="timestamp_granularities",
            )
        if granularity != "segment":
            raise InvalidRequest(
                f"timestamp_granularities has {granularity!r}; use segment.", param="timestamp_granularities"
            )


def chunking(form: AudioForm) -> VadOptions | None:
    value = _parse_json(form.chunking_strategy)
    if value is None:
        return VadOptions() if form.response_format in TIMED_FORMATS else None
    if value == "auto":
        return VadOptions()
    try:
        vad = VadConfig.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InvalidRequest(
            f'chunking_strategy must be "auto" or a server_vad object; {where or "value"}: {error["msg"]}',
            param="chunking_strategy",
        ) from None
    return VadOptions(vad.threshold, vad.silence_duration_ms, vad.prefix_padding_ms)


def _parse_json(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw or None
    if not raw.strip():
        return None
    if raw.strip() == "auto":
        return "auto"
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidRequest(
            f'chunking_strategy must be "auto" or a JSON server_vad object, not {raw[:40]!r}.',
            param="chunking_strategy",
        ) from None
