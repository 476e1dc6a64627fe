"""Transcripts: what a transcription produced, and the bodies OpenAI clients parse from it.

json, text, srt, vtt, verbose_json and the SSE events of `stream=true`. Voxtral emits no
timestamps, so segment times are where the server cut the audio (see `app.chunking`), never
invented. `avg_logprob` is the mean log-prob of the segment's tokens (the model's own distribution).
`no_speech_prob` is not available: Voxtral has no no-speech token to read it from, and pieces without
speech are dropped (VAD) before the model sees them, so it is 0.0. `compression_ratio` is computed as
Whisper does (UTF-8 length over zlib-compressed length).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from app.api.sse import sse
from app.chunking import VadOptions
from app.errors import InternalError, InvalidRequest, VoxtralError

log = logging.getLogger(__name__)

LANGUAGES = {
    "en": "english",
    "es": "spanish",
    "fr": "french",
    "pt": "portuguese",
    "hi": "hindi",
    "de": "german",
    "nl": "dutch",
    "it": "italian",
}
"""The languages Voxtral's model card supports: the only `language` values accepted. Other codes,
even valid ISO-639-1 ones mistral-common would take, are refused rather than passed as a `lang:xx`
hint the model was not trained on; leaving `language` out lets the model detect it."""

_LANG_PREFIX = re.compile(r"\s*lang:([a-z]{2,3})(?![a-z])\s*")
_ARROW = re.compile(r"-{2,}>")
_MAYBE_PREFIX = re.compile(r"\s*(l|la|lan|lang|lang:[a-z]{0,3})\s*")

Task = Literal["transcribe", "translate"]


def check_language(code: str | None) -> str | None:
    """The normalised ISO-639-1 code, or None to let the model detect it; 400 if unsupported."""
    if code is None or not code.strip():
        return None
    normalised = code.strip().lower()
    if normalised not in LANGUAGES:
        raise InvalidRequest(
            f"language {code!r} is not supported. Voxtral supports these ISO-639-1 codes: "
            f"{', '.join(LANGUAGES)}. Leave language out to let the model detect it.",
            param="language",
            code="unsupported_language",
        )
    return normalised


@dataclass(frozen=True)
class TranscriptionOptions:
    """A validated transcription or translation request, minus its audio."""

    task: Task = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    chunking: VadOptions | None = None
    """None: the whole file is one request; otherwise it is cut at silences with these options."""
    logprobs: bool = False
    """Compute the tokens' log-probs (verbose_json's avg_logprob, include[]=logprobs)."""
    include_logprobs: bool = False
    """include[]=logprobs: return them (json, and the stream's events)."""


@dataclass(frozen=True)
class PieceResult:
    """One transcribed piece of the audio, at its real place in the file."""

    start_s: float
    end_s: float
    text: str
    token_ids: list[int]
    prompt_tokens: int
    language: str | None = None
    """The language the model announced with a `lang:xx` prefix, if it did."""
    logprobs: list[dict[str, Any]] | None = None
    """The text tokens' log-probs in OpenAI's shape, when asked for."""
    avg_logprob: float = 0.0


@dataclass(frozen=True)
class Transcript:
    options: TranscriptionOptions
    duration_s: float
    pieces: list[PieceResult] = field(default_factory=list)

    @property
    def segments(self) -> list[PieceResult]:
        return [p for p in self.pieces if p.text]

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.segments)

    @property
    def language(self) -> str | None:
        """The language asked for, else the one the model announced most often, else None."""
        if self.options.task == "translate":
            return "en"
        detected = Counter(p.language for p in self.pieces if p.language)
        return self.options.language or (detected.most_common(1)[0][0] if detected else None)

    def usage(self) -> dict[str, Any]:
        prompt = sum(p.prompt_tokens for p in self.pieces)
        completion = sum(len(p.token_ids) for p in self.pieces)
        return transcription_usage(prompt, completion)


def transcription_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The usage object of transcriptions and realtime transcripts (chat's is `render.chat_usage`)."""
    return {
        "type": "tokens",
        "input_tokens": prompt_tokens,
        "output_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def split_language(text: str, final: bool = True) -> tuple[str, str | None] | None:
    """`text` without a leading `lang:xx` and the code it named; None while that cannot be told yet."""
    match = _LANG_PREFIX.match(text)
    if match and (final or match.end() < len(text)):
        return text[match.end() :], match.group(1)
    if not final and _MAYBE_PREFIX.fullmatch(text) is not None:
        return None
    return text, None


class TextJoiner:
    """Streams the pieces' text, in order, as exactly the text the non-streamed answer has.

    Each piece loses its `lang:xx` prefix and surrounding whitespace (trailing whitespace is held
    back until more text follows), and non-empty pieces are joined by one space.
    """

    def __init__(self) -> None:
        self.text = ""
        self._raw = ""
        self._sent = 0

    def add(self, delta: str) -> str:
        self._raw += delta
        return self._release(final=False)

    def end_piece(self) -> str:
        out = self._release(final=True)
        self._raw, self._sent = "", 0
        return out

    def _release(self, final: bool) -> str:
        split = split_language(self._raw, final)
        if split is None:
            return ""
        body = split[0].strip()
        new = body[self._sent :]
        if new and self._sent == 0 and self.text:
            new = " " + new
        self._sent = len(body)
        self.text += new
        return new


# -- bodies --------------------------------------------------------------------------------------
def json_body(transcript: Transcript) -> dict[str, Any]:
    body: dict[str, Any] = {"text": transcript.text, "usage": transcript.usage()}
    if transcript.options.include_logprobs:
        body["logprobs"] = [entry for p in transcript.pieces for entry in p.logprobs or []]
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
def delta_event(delta: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
    event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta}
    if logprobs is not None:
        event["logprobs"] = logprobs
    return sse(event)


def done_event(transcript: Transcript) -> bytes:
    event: dict[str, Any] = {"type": "transcript.text.done", "text": transcript.text}
    if transcript.options.include_logprobs:
        event["logprobs"] = [entry for p in transcript.pieces for entry in p.logprobs or []]
    event["usage"] = transcript.usage()
    return sse(event)


def error_event(exc: VoxtralError) -> bytes:
    """The OpenAI SDK raises an APIError on an event with an `error` key; the stream then ends."""
    return sse(exc.error_body())


Delta = tuple[str, list[dict[str, Any]] | None]
"""Streamed text and the log-probs of the tokens released with it (None unless include[]=logprobs)."""


async def sse_stream(events: AsyncIterator[Delta | Transcript]) -> AsyncIterator[bytes]:
    """`transcript.text.delta` events, then `transcript.text.done` whose text is the deltas joined.

    No `data: [DONE]`: the SDK's transcription stream ends when the response does. A failure after
    the response started becomes an error event, which the SDK raises as an APIError.
    """
    try:
        async for event in events:
            if isinstance(event, Transcript):
                yield done_event(event)  # its text is the deltas joined (TextJoiner)
            elif event[0] or event[1]:
                yield delta_event(*event)
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
