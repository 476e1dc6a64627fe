"""Server VAD turn detection on a live stream, and the audio buffer an utterance is cut from.

OpenAI's `server_vad` fields map onto Silero's probabilities (`app.vad`, one per 32 ms window):
- `threshold`: a window at or over it is speech. Speech starts after `START_WINDOWS` such windows in a
  row (~100 ms, so a click starts no turn), at the first of them.
- `silence_duration_ms`: speech stops once the probability has stayed under `threshold - 0.15` (Silero's
  hysteresis) for this long; `audio_end_ms` is then, so it includes the silence, as OpenAI's does.
- `prefix_padding_ms`: the utterance starts this long before the detected speech (`audio_start_ms`).

`semantic_vad` (`SemanticTurns`) hears speech the same way (OpenAI's default threshold), and asks the
turn-end model at each pause of `PAUSE_MS`: a "pause" turn, which the session answers with `decided`. A
pause judged the end of the turn ends it there; one judged unfinished lets the utterance go on: speech
resuming continues it, and silence lasting the eagerness's `max_wait_s` since speech stopped ends it.

Pure state, no I/O: the session feeds it on the event loop with the probabilities the shared detector
computed in a prep thread. Positions are samples at 16 kHz since the session's first audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.audio import SAMPLE_RATE
from app.serving.realtime.config import SemanticVad, ServerVad, TurnDetection
from app.vad import WINDOW

START_WINDOWS = 3
HYSTERESIS = 0.15
PAUSE_MS = 200
"""semantic_vad asks the turn-end model after this much silence (pipecat's stop_secs with Smart Turn)."""
COMPLETE = 0.5
"""A pause whose P(turn complete) is at least this ends the turn (Smart Turn's own cut)."""


@dataclass(frozen=True)
class Turn:
    kind: str  # "start", "stop", or (semantic_vad) "pause": ask the turn-end model, then call `decided`
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


class SemanticTurns:
    """semantic_vad's turns: a `TurnDetector` hearing pauses of PAUSE_MS, and the waits between them."""

    def __init__(self, vad: SemanticVad, position: int = 0) -> None:
        self.vad = vad
        self.speech = TurnDetector(ServerVad(silence_duration_ms=PAUSE_MS), position)
        self._paused_since: int | None = None  # silence start of a pause judged unfinished
        self._held = np.zeros(0, np.float32)  # windows after an unanswered pause

    @property
    def position(self) -> int:
        return self.speech.position

    def feed(self, probs: np.ndarray) -> list[Turn]:
        """Turns up to the first pause, which is last: the windows after it wait for `decided`."""
        turns: list[Turn] = []
        wait = int(self.vad.max_wait_s * SAMPLE_RATE)
        for index in range(probs.shape[0]):
            for turn in self.speech.feed(probs[index : index + 1]):
                if turn.kind == "stop":
                    self._held = probs[index + 1 :]
                    return [*turns, Turn("pause", turn.at)]
                if self._paused_since is None:
                    turns.append(turn)  # a start; one after an unfinished pause continues the utterance
                self._paused_since = None
            if self._paused_since is not None and self.position - self._paused_since >= wait:
                self._paused_since = None
                turns.append(Turn("stop", self.position))
        return turns

    def decided(self, pause: Turn, complete: bool) -> list[Turn]:
        """After the session asked about `pause`: the turns of the windows held since."""
        quiet = -(-PAUSE_MS * SAMPLE_RATE // 1000 // WINDOW) * WINDOW  # the whole windows a pause takes
        self._paused_since = None if complete else pause.at - quiet
        held, self._held = self._held, np.zeros(0, np.float32)
        return self.feed(held)

    def restart(self, speaking: bool) -> None:
        self.speech.restart(speaking)
        self._paused_since = None


def detector(vad: TurnDetection | None, position: int = 0) -> TurnDetector | SemanticTurns:
    """The turns of `vad` (a TurnDetector with OpenAI's defaults when off: it is then not fed)."""
    if isinstance(vad, SemanticVad):
        return SemanticTurns(vad, position)
    return TurnDetector(vad or ServerVad(), position)


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
        out = self.peek(start, stop)
        self.drop_before(stop)
        return out

    def peek(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) (clipped to what is held), kept: a copy of only the chunks that overlap it, so a
        streaming session feeding each append's tail copies that tail, not the whole utterance."""
        low, high = max(start, self.start), min(stop, self.end)
        parts, at = [], self.start
        for chunk in self._chunks:
            if at >= high:
                break
            end = at + chunk.shape[0]
            if end > low:
                parts.append(chunk[max(0, low - at) : high - at])
            at = end
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def drop_before(self, position: int) -> None:
        """Forget audio before `position` (idle audio older than the prefix padding); only the chunk the cut falls
        in is sliced (a view)."""
        cut = min(max(0, position - self.start), self._size)
        if cut == 0:
            return
        left, chunks = cut, self._chunks
        while chunks and chunks[0].shape[0] <= left:
            left -= chunks[0].shape[0]
            chunks = chunks[1:]
        if left:
            chunks = [chunks[0][left:], *chunks[1:]]
        self._chunks, self._size, self.start = chunks, self._size - cut, self.start + cut

    def clear(self) -> None:
        self.drop_before(self.end)
