"""Cut long audio into pieces of at most 30 s at its pauses, so each piece is one Voxtral request.

Voxtral's encoder sees audio in 30 s windows (375 audio tokens each, the last one padded), so a
piece of up to 30 s costs exactly one window and pieces of one file can run as rows of the same
batch: a long file then takes about as long as its longest piece instead of its whole length.

Energy-based: 20 ms frames, their level in dB relative to the loud part of the file (so a quiet
recording is cut like a loud one), frames under the `threshold` line are silent and runs of them
at least `silence_duration_ms` long are pauses. Each cut falls inside a pause, preferring the
longest pause near the end of the 30 s window, and keeps `prefix_padding_ms` of silence before the
speech that follows. Only where no pause exists in the second half of the window is a piece cut
at its quietest frame. Long silence around a piece's speech is trimmed (but the padding), so segment
times bracket what was said, and pieces with no speech are dropped: they would cost a model call
and are where speech models invent text. Pure numpy; memory is one float per frame, never a copy of the
audio (pieces are sample ranges, sliced as views).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

SAMPLE_RATE = 16000
FRAME = 320
"""Samples per analysis frame (20 ms at 16 kHz)."""

MAX_PIECE_S = 30.0
"""Voxtral's window: a longer piece would pay for a second, mostly padded, 375-token window."""

LATE_FRACTION = 1 / 3
"""Pauses in this last part of a window are preferred by length; earlier ones only if none is there."""

SILENCE_RANGE_DB = (50.0, 10.0)
"""How far under the file's loud level the silence line is, at threshold 0 and at threshold 1 (so even
at 1, speech louder than its quiet syllables is never all silence)."""

ABSOLUTE_SILENCE_DB = -70.0
"""Frames quieter than this (dBFS) are silent whatever the file's level, so silence alone is no speech."""

TRIM_SILENCE_S = 2.0
"""Silence longer than this at either end of a piece is left out (but the padding); shorter is kept, so a
short clip goes to the model exactly as it came."""

MIN_SPEECH_FRAMES = 5
"""A piece needs at least this many loud frames (100 ms) to count as speech and be transcribed."""


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


@dataclass(frozen=True)
class _Pause:
    start: int  # frame index of its first silent frame
    end: int  # frame index after its last silent frame

    @property
    def length(self) -> int:
        return self.end - self.start


def whole(audio: np.ndarray) -> list[Piece]:
    """The file as one piece (no chunking)."""
    return [Piece(0, int(audio.shape[0]))]


def split_at_silences(audio: np.ndarray, options: VadOptions) -> list[Piece]:
    """Pieces of at most `max_piece_s`, cut inside pauses, covering every part of `audio` with speech."""
    levels = frame_levels(audio)
    silent = levels < silence_line(levels, options.threshold)
    pauses = find_pauses(silent, max(1, round(options.silence_duration_ms / 20)))
    cuts = plan_cuts(levels, pauses, options)
    bounds = [0, *(c * FRAME for c in cuts), int(audio.shape[0])]
    padding = round(options.prefix_padding_ms / 20)
    pieces = [_trimmed(Piece(a, b), silent, padding) for a, b in pairwise(bounds) if b > a]
    return [p for p in pieces if p is not None]


def frame_levels(audio: np.ndarray) -> np.ndarray:
    """Mean power of each 20 ms frame in dBFS (the last, partial frame included)."""
    n = int(audio.shape[0])
    full = n // FRAME
    frames = audio[: full * FRAME].reshape(full, FRAME)
    power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / FRAME
    if n % FRAME:
        tail = audio[full * FRAME :].astype(np.float64)
        power = np.append(power, float(np.dot(tail, tail)) / tail.shape[0])
    return np.asarray(10.0 * np.log10(power + 1e-12), dtype=np.float32)


def silence_line(levels: np.ndarray, threshold: float) -> float:
    """The level under which a frame is silent: relative to the loud part of the file, with a floor."""
    if levels.size == 0:
        return ABSOLUTE_SILENCE_DB
    loud = float(np.percentile(levels, 95))
    widest, narrowest = SILENCE_RANGE_DB
    return max(ABSOLUTE_SILENCE_DB, loud - narrowest - (widest - narrowest) * (1.0 - threshold))


def find_pauses(silent: np.ndarray, min_frames: int) -> list[_Pause]:
    """Runs of at least `min_frames` silent frames."""
    edges = np.diff(np.concatenate(([0], silent.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [_Pause(int(a), int(b)) for a, b in zip(starts, ends, strict=True) if b - a >= min_frames]


def plan_cuts(levels: np.ndarray, pauses: list[_Pause], options: VadOptions) -> list[int]:
    """Frame indices to cut at, greedily: each piece as long as a good cut allows, never over the limit."""
    limit = max(1, int(options.max_piece_s * SAMPLE_RATE) // FRAME)
    padding = round(options.prefix_padding_ms / 20)
    cuts: list[int] = []
    start = 0
    while levels.shape[0] - start > limit:
        cut = _cut_in_pause(pauses, start, start + limit, padding)
        if cut is None:
            cut = _quietest(levels, start + max(1, limit // 2), start + limit)
        cuts.append(cut)
        start = cut
    return cuts


def _cut_in_pause(pauses: list[_Pause], start: int, stop: int, padding: int) -> int | None:
    """Where to cut in the best pause of the window's second half, or None if it has none."""
    low = start + max(1, (stop - start) // 2)
    inside = [p for p in pauses if p.end > low and p.start < stop]
    if not inside:
        return None
    late = [p for p in inside if p.end > stop - (stop - start) * LATE_FRACTION]
    best = max(late, key=lambda p: (p.length, p.start)) if late else inside[-1]
    preferred = max(best.end - padding, (best.start + best.end) // 2)
    return min(max(preferred, best.start, low + 1), best.end, stop)


def _quietest(levels: np.ndarray, low: int, high: int) -> int:
    """The latest of the quietest frames in [low, high): the least bad place to cut through speech."""
    window = levels[low:high]
    return low + int(window.shape[0] - 1 - np.argmin(window[::-1]))


def _trimmed(piece: Piece, silent: np.ndarray, padding: int) -> Piece | None:
    """The piece without long silence around its speech (but `padding` frames of it), or None if it has
    no speech: segment times then bracket what was said, and a silent piece costs no model call."""
    first, stop = piece.start // FRAME, -(-piece.end // FRAME)
    loud = np.flatnonzero(~silent[first:stop])
    if loud.shape[0] < MIN_SPEECH_FRAMES:
        return None
    long_silence = round(TRIM_SILENCE_S * SAMPLE_RATE / FRAME)
    start, end = piece.start, piece.end
    if loud[0] > long_silence:
        start = (first + int(loud[0]) - padding) * FRAME
    if stop - first - 1 - loud[-1] > long_silence:
        end = (first + int(loud[-1]) + 1 + padding) * FRAME
    return Piece(start, end)
