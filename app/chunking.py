"""Cut audio into pieces of at most 30 s around its speech, so each piece is one Voxtral request.

Voxtral's encoder sees audio in 30 s windows (375 audio tokens each, the last one padded), so a
piece of up to 30 s costs exactly one window and pieces of one file can run as rows of the same
batch: a long file then takes about as long as its longest piece instead of its whole length.

Speech is what Silero VAD (`app.vad`) says it is, so noise (a fan, a street, a bad line) is not taken
for speech as an energy threshold takes it, and pieces and segment times bracket what was said.
OpenAI's `server_vad` parameters map onto Silero's:

- `threshold`: Silero's speech probability threshold (a 32 ms window at or over it is speech; speech
  then lasts until the probability falls under `threshold - 0.15`).
- `silence_duration_ms`: Silero's `min_silence_duration_ms`: a speech stretch ends only after this much
  non-speech, so shorter pauses stay inside it.
- `prefix_padding_ms`: audio kept before a piece's first speech (never reaching into the piece before);
  after its last speech a fixed `TAIL_PADDING_MS` is kept, so word endings are not clipped.

Speech stretches less than `JOIN_GAP_S` apart are joined into one piece while it stays within 30 s
(one model call instead of several, each paying for a whole window); longer non-speech is left out,
and audio with no speech gives no piece: it would cost a model call and is where speech models invent
text. Pieces are sample ranges, sliced as views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app import vad
from app.audio import SAMPLE_RATE

MAX_PIECE_S = 30.0
"""Voxtral's window: a longer piece would pay for a second, mostly padded, 375-token window."""

JOIN_GAP_S = 1.2
"""Speech stretches closer than this share a piece; a longer gap is left out (a piece never spans
more than about a second of non-speech unless `silence_duration_ms` asks for it)."""

TAIL_PADDING_MS = 200
"""Audio kept after a piece's last speech window (Silero marks the end where the voice drops)."""

EDGE_S = 0.5
"""A piece this close to the start or end of the file reaches it: a clip that is speech from end to end
goes to the model exactly as it came, so every response_format gives the same text for it."""


@dataclass(frozen=True)
class VadOptions:
    """OpenAI's `server_vad` chunking parameters, with its defaults (`auto` uses these)."""

    threshold: float = 0.5
    silence_duration_ms: int = 200
    prefix_padding_ms: int = 300
    max_piece_s: float = MAX_PIECE_S


@dataclass(frozen=True)
class Piece:
    """A range of samples [start, end) of the 16 kHz audio."""

    start: int
    end: int

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE


def whole(audio: np.ndarray) -> list[Piece]:
    """The file as one piece (no chunking)."""
    return [Piece(0, int(audio.shape[0]))]


def split_at_silences(audio: np.ndarray, options: VadOptions) -> list[Piece]:
    """Pieces of at most `max_piece_s` around the speech of `audio` (CPU: run it off the event loop)."""
    return pieces_from(vad.file_probabilities(audio), int(audio.shape[0]), options)


def pieces_from(probs: np.ndarray, length: int, options: VadOptions) -> list[Piece]:
    """Pieces from per-window speech probabilities of audio `length` samples long."""
    limit = int(options.max_piece_s * SAMPLE_RATE)
    before = min(_samples(options.prefix_padding_ms), limit // 4)
    after = min(_samples(TAIL_PADDING_MS), limit // 4)
    longest = max(1.0, (limit - before - after) / SAMPLE_RATE)
    spans = vad.speech_spans(probs, length, options.threshold, options.silence_duration_ms, longest)
    groups = _joined(spans, int(JOIN_GAP_S * SAMPLE_RATE), limit - before - after)
    return _to_edges(_padded(groups, before, after, length), length, limit)


def _joined(spans: list[tuple[int, int]], gap: int, longest: int) -> list[tuple[int, int]]:
    """Neighbouring spans merged while the gap between them is short and the result not too long."""
    groups: list[tuple[int, int]] = []
    for start, end in spans:
        if groups and start - groups[-1][1] <= gap and end - groups[-1][0] <= longest:
            groups[-1] = (groups[-1][0], end)
        else:
            groups.append((start, end))
    return groups


def _padded(groups: list[tuple[int, int]], before: int, after: int, length: int) -> list[Piece]:
    """Each group with its padding, clipped so pieces never overlap or leave the audio."""
    starts = [max(0, start - before, groups[i - 1][1] if i else 0) for i, (start, _) in enumerate(groups)]
    pieces = []
    for i, (_, end) in enumerate(groups):
        stop = min(length, end + after, starts[i + 1] if i + 1 < len(groups) else length)
        pieces.append(Piece(starts[i], stop))
    return pieces


def _to_edges(pieces: list[Piece], length: int, limit: int) -> list[Piece]:
    edge = int(EDGE_S * SAMPLE_RATE)
    if pieces and 0 < pieces[0].start <= edge and pieces[0].end <= limit:
        pieces[0] = Piece(0, pieces[0].end)
    if pieces and pieces[-1].end >= length - edge and length - pieces[-1].start <= limit:
        pieces[-1] = Piece(pieces[-1].start, length)
    return pieces


def _samples(ms: int) -> int:
    return int(ms * SAMPLE_RATE / 1000)
