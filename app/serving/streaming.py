"""The HTTP use cases over a Voxtral Realtime model: `POST /v1/audio/transcriptions` through the same ticking
loop as the realtime sessions (the whole file fed at once, then flushed: one token per 80 ms of audio as ticks
reach it), and a clear 400 for what a transcription-only model cannot do (chat, responses, translations).

Refused with a 400 (`unsupported`): translations; response_format srt and vtt (the model gives no segment
timestamps), include[]=logprobs and timestamp_granularities[] (no log-probs, no timestamps); temperature
other than 0 (the model decodes greedily). Accepted: json, text, verbose_json (its one segment spans the file),
stream=true (`transcript.text.delta` as ticks emit tokens, then `transcript.text.done`); chunking_strategy is
ignored (a stream has no length limit; --max-transcription-audio-s still bounds the file), and so are
`language` (checked, then unused: the model detects the language as it goes) and `prompt` (the model takes no
prompt). The file's last token comes within --request-timeout-s, else a 504.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.audio import SAMPLE_RATE
from app.config import Settings
from app.errors import RequestTimeout, UnsupportedFeature, VoxtralError
from app.model.realtime.engine import StreamStep
from app.serving.chat import ChatAnswer
from app.serving.prep import Prep
from app.serving.realtime.streams import Stream, StreamLoop
from app.serving.record import RequestRecord
from app.serving.schemas import ChatCompletionRequest
from app.serving.service import Routes
from app.serving.transcription import Upload
from app.serving.transcription_request import AudioForm
from app.serving.transcripts import (
    PieceResult,
    Task,
    TextJoiner,
    Transcript,
    TranscriptDelta,
    TranscriptionOptions,
    check_language,
)

FORMATS = ("json", "text", "verbose_json")


class TranscriptionOnly:
    """The chat side of a transcription-only model (a `Chats`): every call is a 400."""

    async def start(self, body: ChatCompletionRequest, record: RequestRecord | None, owner: str = "") -> ChatAnswer:
        raise UnsupportedFeature(
            "This server runs a Voxtral Realtime model, which only transcribes: use /v1/audio/transcriptions or "
            "/v1/realtime?intent=transcription.",
            param="model",
        )


@dataclass
class StreamRun:
    """One file in one stream: `deltas()` (text as ticks emit it, then the Transcript) or `result()`."""

    stream: Stream
    options: TranscriptionOptions
    duration_s: float
    timeout_s: float
    """--request-timeout-s: the file's last token comes within it, else RequestTimeout (504), as on the engine."""
    tokens: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        self.stream.close()

    async def result(self) -> Transcript:
        transcript = None
        async for event in self.deltas():
            if isinstance(event, Transcript):
                transcript = event
        assert transcript is not None
        return transcript

    async def deltas(self) -> AsyncIterator[TranscriptDelta | Transcript]:
        joiner = TextJoiner()
        try:
            async for step in self._steps():
                self.tokens.append(step.token)
                if text := joiner.add(step.text):
                    yield TranscriptDelta(text)
            if text := joiner.end_piece():
                yield TranscriptDelta(text)
        finally:
            self.cancel()
        piece = PieceResult(0.0, self.duration_s, joiner.text, self.tokens, 0)
        yield Transcript(self.options, self.duration_s, [piece])

    async def _steps(self) -> AsyncIterator[StreamStep]:
        """The stream's steps, each awaited against the request's deadline (never across a `yield`)."""
        steps = self.stream.steps()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    step = await anext(steps)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeout(f"The request did not finish within {self.timeout_s:g} s.") from None
            yield step


class StreamingServing(Routes):
    """The routes' `Serving` for a Voxtral Realtime model (same calls; chat ones refused)."""

    def __init__(self, settings: Settings, streams: StreamLoop) -> None:
        self.settings, self.streams = settings, streams
        self.prep = Prep(settings, None)
        self.chats = TranscriptionOnly()
        self.fingerprint = ""
        """No chat answer carries it (chat is refused); the routes' `Serving` has one."""

    async def transcribe(
        self, form: AudioForm, upload: Upload, task: Task, record: RequestRecord | None = None, owner: str = ""
    ) -> StreamRun:
        self.prep.check_model(form.model)
        options = _options(form, task)
        raw = await self.prep.read_upload(upload.read)
        try:
            audio = await self.prep.audio(raw, upload.filename, self.settings.max_transcription_audio_s, record)
        except VoxtralError as exc:
            exc.param = exc.param or "file"
            raise
        stream, _ = self.streams.open(None)
        stream.feed(audio)
        stream.flush()
        return StreamRun(stream, options, audio.shape[0] / SAMPLE_RATE, self.settings.request_timeout_s)

    async def warm_up(self) -> None:
        """One second of silence through the loop, so the first request pays no one-time cost."""
        import numpy as np

        stream, _ = self.streams.open(None)
        stream.feed(np.zeros(SAMPLE_RATE, dtype=np.float32))
        stream.flush()
        async for _ in stream.steps():
            pass
        stream.close()

    def close(self) -> None:
        self.streams.stop()
        self.prep.close()


def _options(form: AudioForm, task: Task) -> TranscriptionOptions:
    """The request as this model can run it, or a 400 naming what it cannot."""
    refused = [
        (task == "translate", "file", "Translation is not supported by a Voxtral Realtime model: it only transcribes."),
        (
            form.response_format not in FORMATS,
            "response_format",
            f"response_format must be one of {FORMATS} with a Voxtral Realtime model (it gives no segment timestamps).",
        ),
        (bool(form.include), "include", "include[]=logprobs is not supported by a Voxtral Realtime model."),
        (
            bool(form.timestamp_granularities),
            "timestamp_granularities",
            "timestamp_granularities[] is not supported by a Voxtral Realtime model (it gives no timestamps).",
        ),
        (form.temperature != 0, "temperature", "A Voxtral Realtime model decodes greedily: temperature must be 0."),
    ]
    for bad, param, message in refused:
        if bad:
            raise UnsupportedFeature(message, param=param)
    return TranscriptionOptions(task, check_language(form.language), form.prompt)
