"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart, as the OpenAI SDK sends)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.api import render
from app.api.service import Service
from app.errors import InvalidRequest, UnsupportedFeature

router = APIRouter(prefix="/v1/audio", tags=["audio"])
FORMATS = ("json", "text")


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def _run(
    request: Request,
    file: UploadFile,
    model: str,
    language: str | None,
    response_format: str,
    temperature: float,
    task: str,
) -> Response:
    service = _service(request)
    service.check_model(model)
    if response_format not in FORMATS:
        raise UnsupportedFeature(
            f"response_format {response_format!r} is not supported; use one of {', '.join(FORMATS)}.",
            param="response_format",
        )
    if not 0.0 <= temperature <= 1.0:
        raise InvalidRequest("temperature must be between 0 and 1.", param="temperature")
    data = await file.read()
    audio = await service.load_audio(data, file.filename, service.settings.max_transcription_audio_s)
    result = await service.transcribe(audio, language or None, temperature, task)
    if response_format == "text":
        return PlainTextResponse(result.text + "\n")
    body: dict[str, Any] = render.transcription_json(result)
    return JSONResponse(body)


@router.post("/transcriptions", response_model=None)
async def transcriptions(
    request: Request,
    file: Annotated[UploadFile, File(description="Audio file: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav or webm.")],
    model: Annotated[str, Form()],
    language: Annotated[str | None, Form(description="ISO-639-1 code; detected when absent.")] = None,
    prompt: Annotated[
        str | None, Form(description="Accepted and ignored: Voxtral's transcription format has no prompt.")
    ] = None,
    response_format: Annotated[str, Form()] = "json",
    temperature: Annotated[float, Form()] = 0.0,
) -> Response:
    return await _run(request, file, model, language, response_format, temperature, "transcribe")


@router.post("/translations", response_model=None)
async def translations(
    request: Request,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()],
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[str, Form()] = "json",
    temperature: Annotated[float, Form()] = 0.0,
) -> Response:
    return await _run(request, file, model, None, response_format, temperature, "translate")
