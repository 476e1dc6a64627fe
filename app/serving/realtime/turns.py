"""Server VAD turn detection on a live stream, and the audio buffer an utterance is cut from.

OpenAI's `server_vad` fields map onto Silero's probabilities (`app.vad`, one per 32 ms window):
- `threshold`: a window at or over it is speech. Speech starts after `START_WINDOWS` such windows in a
  row (~100 ms, so a click starts no turn), at the first of them.
- `silence_duration_ms`: speech stops once the probability has stayed under `threshold - 0.15` (Silero's
  hysteresis) for this long; `audio_end_ms` is then, so it includes the silence, as OpenAI's does.
- `prefix_padding_ms`: the utterance starts this long before the detected speech (`audio_start_ms`).

Pure state, no I/O: the session feeds it on the event loop with the probabilities the shared detector
computed in a prep thread. Positions are samples at 16 kHz since the session's first audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.audio import SAMPLE_RATE
from app.serving.realtime.config import ServerVad
from app.vad import WINDOW

START_WINDOWS = 3
HYSTERESIS = 0.15


@dataclass(frozen=True)
class Turn:
    kind: str  # "start" or "stop"
    at: int  # sample position


class TurnDetector:
    def __init__(self, vad: ServerVad, position: int = 0) -> None:
        self.vad = vad
        self.position = position
        """Sample position after the last window fed."""
        self.speaking = False
        self._run = 0  # speech windows in a row while not speaking
        self._quiet_since: int | None = None

    def feed(self, probs: np.ndarray) -> list[Turn]:
        turns: list[Turn] = []
        silence = int(self.vad.silence_duration_ms * SAMPLE_RATE / 1000)
        for prob in probs:
            start, self.position = self.position, self.position + WINDOW
            if not self.speaking:
                self._run = self._run + 1 if prob >= self.vad.threshold else 0
                if self._run >= START_WINDOWS:
                    self.speaking, self._quiet_since = True, None
                    turns.append(Turn("start", self.position - START_WINDOWS * WINDOW))
            elif prob >= self.vad.threshold:
                self._quiet_since = None
            elif prob < self.vad.threshold - HYSTERESIS and self._quiet_since is None:
                self._quiet_since = start
            if self.speaking and self._quiet_since is not None and self.position - self._quiet_since >= silence:
                self.speaking, self._run = False, 0
                turns.append(Turn("stop", self.position))
        return turns

    def restart(self, speaking: bool) -> None:
        """After an utterance was cut at the length limit (still speaking) or committed by hand (not)."""
        self.speaking, self._run, self._quiet_since = speaking, 0, None


class AudioBuffer:
    """The session's uncommitted 16 kHz audio: [start, end) of the session's timeline."""

    def __init__(self) -> None:
        self.start = 0
        self._chunks: list[np.ndarray] = []
        self._size = 0

    @property
    def end(self) -> int:
        return self.start + self._size

    def append(self, samples: np.ndarray) -> None:
        if samples.shape[0]:
            self._chunks.append(samples)
            self._size += samples.shape[0]

    def take(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) (clipped to what is held); everything before `stop` is dropped."""
        held = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        out = held[max(0, start - self.start) : max(0, stop - self.start)]
        self.drop_before(stop)
        return out

    def drop_before(self, position: int) -> None:
        """Forget audio before `position` (idle audio older than the prefix padding)."""
        cut = min(max(0, position - self.start), self._size)
        if cut == 0:
            return
        held = np.concatenate(self._chunks)[cut:]
        self._chunks, self._size, self.start = ([held] if held.shape[0] else []), held.shape[0], self.start + cut

    def clear(self) -> None:
        self.drop_before(self.end)
