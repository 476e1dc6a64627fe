"""Transcripts -> the bodies OpenAI clients parse: json, text, srt, vtt, verbose_json, and the SSE events
of `stream=true`.

Segment times are where the server cut the audio (see `app.chunking`). `no_speech_prob` is not
available: Voxtral has no no-speech token to read it from, and pieces without speech are dropped (VAD)
before the model sees them, so it is 0.0. `compression_ratio` is computed as Whisper does (UTF-8 length
over zlib-compressed length).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import Response

from app.api.jsonbody import JSONBody
from app.api.render import logprob_entries
from app.api.sse import sse
from app.errors import InternalError, VoxtralError
from app.serving.transcripts import LANGUAGES, PieceResult, Transcript, TranscriptDelta

log = logging.getLogger(__name__)
_ARROW = re.compile(r"-{2,}>")


def usage(transcript: Transcript) -> dict[str, Any]:
    """The usage object of transcriptions and realtime transcripts (chat's is `render.chat_usage`)."""
    prompt, completion = transcript.prompt_tokens, transcript.completion_tokens
    return {"type": "tokens", "input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}


def json_body(transcript: Transcript) -> dict[str, Any]:
    """A transcription's `languages` (what gpt-transcribe returns, and LiveKit reads) when the language is
    known: asked for, or announced by the model; left out otherwise, and from translations."""
    body: dict[str, Any] = {"text": transcript.text, "usage": usage(transcript)}
    if transcript.options.task == "transcribe" and transcript.language:
        body["languages"] = [{"code": transcript.language}]
    if transcript.options.include_logprobs:
        body["logprobs"] = logprob_entries(transcript.logprobs)
    return body


def verbose_json_body(transcript: Transcript) -> dict[str, Any]:
    language = transcript.language
    return {
        "task": transcript.options.task,
        "language": LANGUAGES.get(language, language) if language else "unknown",
        "duration": round(transcript.duration_s, 3),
        "text": transcript.text,
        "segments": [_segment(i, p, transcript.options.temperature) for i, p in enumerate(transcript.segments)],
        "usage": {"type": "duration", "seconds": round(transcript.duration_s, 3)},
    }


def _segment(index: int, piece: PieceResult, temperature: float) -> dict[str, Any]:
    return {
        "id": index,
        "seek": round(piece.start_s * 100),  # Whisper's unit: 10 ms mel frames
        "start": round(piece.start_s, 3),
        "end": round(piece.end_s, 3),
        "text": piece.text,
        "tokens": list(piece.token_ids),
        "temperature": temperature,
        "avg_logprob": piece.avg_logprob,
        "compression_ratio": compression_ratio(piece.text),
        "no_speech_prob": 0.0,
    }


def compression_ratio(text: str) -> float:
    """Whisper's repetition check: high values (> 2.4) mean the text repeats itself."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def text_body(transcript: Transcript) -> str:
    return transcript.text + "\n"


def srt_body(transcript: Transcript) -> str:
    cues = [
        f"{i}\n{timestamp(p.start_s, ',')} --> {timestamp(p.end_s, ',')}\n{text}\n"
        for i, (p, text) in enumerate(_cues(transcript), start=1)
    ]
    return "\n".join(cues)


def vtt_body(transcript: Transcript) -> str:
    cues = [f"{timestamp(p.start_s, '.')} --> {timestamp(p.end_s, '.')}\n{text}\n" for p, text in _cues(transcript)]
    return "\n".join(["WEBVTT\n", *cues])


def _cues(transcript: Transcript) -> list[tuple[PieceResult, str]]:
    cues = [(piece, cue_text(piece.text)) for piece in transcript.segments]
    return [(piece, text) for piece, text in cues if text]


def cue_text(text: str) -> str:
    """A cue's lines: no blank line (it would end the cue) and no arrow (a reader would take the line for
    a timing line)."""
    lines = (line.strip() for line in text.splitlines())
    return _ARROW.sub("->", "\n".join(line for line in lines if line))


def timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS,mmm (SubRip) or HH:MM:SS.mmm (WebVTT)."""
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{decimal}{rest % 1000:03d}"


# -- server-sent events --------------------------------------------------------------------------
def delta_event(delta: TranscriptDelta) -> bytes:
    event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta.text}
    if delta.logprobs is not None:
        event["logprobs"] = logprob_entries(delta.logprobs)
    return sse(event)


def done_event(transcript: Transcript) -> bytes:
    event: dict[str, Any] = {"type": "transcript.text.done", "text": transcript.text}
    if transcript.options.include_logprobs:
        event["logprobs"] = logprob_entries(transcript.logprobs)
    event["usage"] = usage(transcript)
    return sse(event)


def error_event(exc: VoxtralError) -> bytes:
    """The OpenAI SDK raises an APIError on an event with an `error` key; the stream then ends."""
    return sse(exc.error_body())


async def sse_stream(events: AsyncIterator[TranscriptDelta | Transcript]) -> AsyncIterator[bytes]:
    """`transcript.text.delta` events, then `transcript.text.done` whose text is the deltas joined.

    No `data: [DONE]`: the SDK's transcription stream ends when the response does. A failure after
    the response started becomes an error event, which the SDK raises as an APIError.
    """
    try:
        async for event in events:
            if isinstance(event, Transcript):
                yield done_event(event)  # its text is the deltas joined (TextJoiner)
            elif event.text or event.logprobs:
                yield delta_event(event)
    except VoxtralError as exc:
        yield error_event(exc)
    except Exception:
        log.exception("transcription stream failed")
        yield error_event(InternalError("The server had an internal error while transcribing."))


RENDERERS: dict[str, tuple[Callable[[Transcript], Any], str]] = {
    "json": (json_body, "application/json"),
    "verbose_json": (verbose_json_body, "application/json"),
    "text": (text_body, "text/plain; charset=utf-8"),
    "srt": (srt_body, "text/plain; charset=utf-8"),
    "vtt": (vtt_body, "text/vtt; charset=utf-8"),
}
"""response_format -> (body, media type). The JSON ones return dicts; the others text."""


def response(transcript: Transcript, response_format: str) -> Response:
    body, media_type = RENDERERS[response_format]
    content = body(transcript)
    return JSONBody(content) if isinstance(content, dict) else Response(content, media_type=media_type)
