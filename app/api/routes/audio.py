"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart, as the OpenAI SDK sends).

Formats: json, text, srt, vtt, verbose_json; `stream=true` answers server-sent events (json and
text only: the events carry text, not timestamps). What the fields mean and which values are
refused: app/serving/transcription_request.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from app.api import transcripts
from app.api.clients import client_key
from app.api.context import Context
from app.api.disconnect import StoppingStream, client_closed, unless_gone
from app.api.record import record_of
from app.serving.transcription import Upload
from app.serving.transcription_request import AudioForm
from app.serving.transcripts import Task

router = APIRouter(prefix="/v1/audio", tags=["audio"])


async def _run(request: Request, ctx: Context, file: UploadFile, form: AudioForm, task: Task) -> Response:
    owner = client_key(request, ctx.settings)
    run = await ctx.serving.transcribe(form, Upload(file.read, file.filename), task, record_of(request), owner)
    if form.stream:
        events = transcripts.sse_stream(run.deltas())
        return StoppingStream(events, stop=run.cancel, headers={"Cache-Control": "no-cache"})
    # A long file's pieces stop at once when the client goes away, instead of decoding for nobody.
    transcript = await unless_gone(request, run.result())
    if transcript is None:
        return client_closed()
    return transcripts.response(transcript, form.response_format)


async def _chunking(request: Request, chunking_strategy: str | None) -> Any:
    """`chunking_strategy`: "auto", a JSON object, or the object as the SDK sends it (`chunking_strategy[type]`...)."""
    fields = await request.form()
    nested = {k[18:-1]: v for k, v in fields.items() if k.startswith("chunking_strategy[") and k.endswith("]")}
    return nested or chunking_strategy


AudioFile = Annotated[UploadFile, File(description="Audio file: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav or webm.")]
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
    ctx: Context,
    file: AudioFile,
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
    chunking = await _chunking(request, chunking_strategy)
    form = AudioForm(model, response_format, temperature, prompt, language, stream, chunking, *extras)
    return await _run(request, ctx, file, form, "transcribe")


@router.post("/translations", response_model=None, responses=ANSWERS)
async def translations(
    request: Request,
    ctx: Context,
    file: AudioFile,
    model: Annotated[str, Form()],
    prompt: Annotated[str | None, Form(description="Context for the translation (e.g. the text before it).")] = None,
    response_format: Format = "json",
    temperature: Temperature = 0.0,
    stream: Stream = False,
    chunking_strategy: Chunking = None,
) -> Response:
    chunking = await _chunking(request, chunking_strategy)
    form = AudioForm(model, response_format, temperature, prompt, None, stream, chunking)
    return await _run(request, ctx, file, form, "translate")
