"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart, as the OpenAI SDK sends).

Formats: json, text, srt, vtt, verbose_json; `stream=true` answers server-sent events (json and
text only: the events carry text, not timestamps). `chunking_strategy` unset transcribes the whole
file as one Voxtral request; `auto` or a `server_vad` object cuts it at silences into pieces of at
most 30 s that run as rows of the same batch. srt, vtt and verbose_json default to `auto`, because
their segment times are those cuts: Voxtral emits no timestamps of its own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api import transcripts
from app.api.disconnect import StoppingStream, client_closed, unless_gone
from app.api.record import RequestRecord, record_of
from app.api.service import Service
from app.api.transcripts import Task, Transcript, TranscriptionOptions
from app.chunking import VadOptions
from app.errors import InvalidRequest, PayloadTooLarge, UnsupportedFeature

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/audio", tags=["audio"])
FORMATS = tuple(transcripts.RENDERERS)
TIMED_FORMATS = frozenset({"srt", "vtt", "verbose_json"})
STREAM_FORMATS = frozenset({"json", "text"})
_READ_BLOCK = 1 << 20


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
    chunking_strategy: str | None = None
    timestamp_granularities: tuple[str, ...] = ()
    include: tuple[str, ...] = ()


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def _run(request: Request, file: UploadFile, form: AudioForm, task: Task) -> Response:
    service = _service(request)
    service.check_model(form.model)
    options = _options(form, task, await _chunking(request, form))
    record = record_of(request)
    with service.engine.admission() as reservation:
        audio = await _decode(service, file, record)
        run = await service.start_transcription(
            audio, options, stream=form.stream, reservation=reservation, record=record
        )
    del audio  # the pieces hold their features now; let a long file's samples go
    if form.stream:
        events = transcripts.sse_stream(service.stream_transcription(run))
        return StoppingStream(events, stop=run.cancel, headers={"Cache-Control": "no-cache"})
    try:
        # A long file's pieces stop at once when the client goes away, instead of decoding for nobody.
        transcript = await unless_gone(request, service.finish_transcription(run))
    finally:
        run.cancel()  # no-op for finished pieces
    if transcript is None:
        return client_closed()
    return _render(transcript, form.response_format)


def _options(form: AudioForm, task: Task, chunking: VadOptions | None) -> TranscriptionOptions:
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
    if not 0.0 <= form.temperature <= 1.0:
        raise InvalidRequest("temperature must be between 0 and 1.", param="temperature")
    _check_granularities(form.timestamp_granularities)
    include_logprobs = "logprobs" in form.include
    if include_logprobs and form.response_format != "json":
        raise InvalidRequest("include[]=logprobs works with response_format json only.", param="include")
    if form.prompt and task == "transcribe":
        log.debug("prompt ignored: Voxtral's transcription format has no prompt")
    language = transcripts.check_language(form.language) if task == "transcribe" else None
    scores = include_logprobs or form.response_format == "verbose_json"  # verbose_json: segments' avg_logprob
    return TranscriptionOptions(
        task, language, form.prompt, form.temperature, chunking, logprobs=scores, include_logprobs=include_logprobs
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


async def _chunking(request: Request, form: AudioForm) -> VadOptions | None:
    """`chunking_strategy`: "auto", a JSON object, or the object as the SDK sends it (`chunking_strategy[type]`...)."""
    fields = await request.form()
    nested = {k[18:-1]: v for k, v in fields.items() if k.startswith("chunking_strategy[") and k.endswith("]")}
    value: Any = nested or _parse_json(form.chunking_strategy)
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


def _parse_json(raw: str | None) -> Any:
    if raw is None or not raw.strip():
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


async def _decode(service: Service, file: UploadFile, record: RequestRecord | None) -> np.ndarray:
    """Read the upload block by block, refusing it (413) as soon as it passes the limit."""
    limit, blocks, size = service.settings.max_upload_bytes, [], 0
    while block := await file.read(_READ_BLOCK):
        size += len(block)
        if size > limit:
            raise PayloadTooLarge(f"The file is larger than the {service.settings.max_upload_mb:g} MB limit.")
        blocks.append(block)
    max_seconds = service.settings.max_transcription_audio_s
    return await service.load_audio(b"".join(blocks), file.filename, max_seconds, record)


def _render(transcript: Transcript, response_format: str) -> Response:
    body, media_type = transcripts.RENDERERS[response_format]
    content = body(transcript)
    if isinstance(content, dict):
        return JSONResponse(content)
    return Response(content, media_type=media_type)


Upload = Annotated[UploadFile, File(description="Audio file: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav or webm.")]
Format = Annotated[str, Form(description="json, text, srt, vtt or verbose_json.")]
Temperature = Annotated[float, Form(description="0 to 1; 0 (greedy) is what Voxtral's model card advises.")]
Stream = Annotated[bool, Form(description="Server-sent transcript.text.delta events, then transcript.text.done.")]
Chunking = Annotated[
    str | None,
    Form(
        description='"auto" or a server_vad JSON object: cut at silences into pieces run as one batch. '
        "Unset: the whole file as one request (srt, vtt and verbose_json default to auto)."
    ),
]
ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The transcript in the response_format asked for, or server-sent events with stream=true.",
        "content": {media: {} for media in ("application/json", "text/plain", "text/vtt", "text/event-stream")},
    }
}
Granularities = Annotated[list[str] | None, Form(alias="timestamp_granularities[]")]
Include = Annotated[list[str] | None, Form(alias="include[]")]


@router.post("/transcriptions", response_model=None, responses=ANSWERS)
async def transcriptions(
    request: Request,
    file: Upload,
    model: Annotated[str, Form()],
    language: Annotated[
        str | None, Form(description="ISO-639-1: en, es, fr, pt, hi, de, nl or it; detected when absent.")
    ] = None,
    prompt: Annotated[
        str | None, Form(description="Accepted and ignored: Voxtral's transcription format has no prompt.")
    ] = None,
    response_format: Format = "json",
    temperature: Temperature = 0.0,
    stream: Stream = False,
    chunking_strategy: Chunking = None,
    timestamp_granularities: Granularities = None,
    include: Include = None,
) -> Response:
    extras = tuple(timestamp_granularities or ()), tuple(include or ())
    form = AudioForm(model, response_format, temperature, prompt, language, stream, chunking_strategy, *extras)
    return await _run(request, file, form, "transcribe")


@router.post("/translations", response_model=None, responses=ANSWERS)
async def translations(
    request: Request,
    file: Upload,
    model: Annotated[str, Form()],
    prompt: Annotated[str | None, Form(description="Context for the translation (e.g. the text before it).")] = None,
    response_format: Format = "json",
    temperature: Temperature = 0.0,
    stream: Stream = False,
    chunking_strategy: Chunking = None,
) -> Response:
    form = AudioForm(model, response_format, temperature, prompt, None, stream, chunking_strategy)
    return await _run(request, file, form, "translate")
