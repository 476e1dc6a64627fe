"""Transcripts: what a transcription or translation produced, as typed values (rendered by app/api).

Voxtral emits no timestamps, so a piece's times are where the server cut the audio (see
`app.chunking`), never invented. `avg_logprob` is the mean log-prob of the piece's tokens.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from app.chunking import VadOptions
from app.errors import InvalidRequest
from app.serving.logprobs import TokenScore

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
    logprobs: list[TokenScore] | None = None
    """The text tokens' log-probs, when asked for."""
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

    @property
    def prompt_tokens(self) -> int:
        return sum(p.prompt_tokens for p in self.pieces)

    @property
    def completion_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.pieces)

    @property
    def logprobs(self) -> list[TokenScore]:
        """Every piece's text tokens' log-probs, in order (include[]=logprobs)."""
        return [entry for p in self.pieces for entry in p.logprobs or []]


@dataclass(frozen=True)
class TranscriptDelta:
    """Streamed text and the log-probs of the tokens released with it (None unless include[]=logprobs)."""

    text: str
    logprobs: list[TokenScore] | None = None


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
