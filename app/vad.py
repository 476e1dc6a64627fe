"""Speech probability of each 32 ms window of 16 kHz audio, from Silero VAD (the model the `silero-vad`
wheel bundles: offline, torch only).

One network is loaded per process and shared. It is called without its wrapper's hidden state: each
stream (a file being chunked, a realtime session) carries its own recurrent state and context in a
`VadStream`, so streams never mix and several threads may call at once. Every call runs torch on the
calling thread: callers keep it off the event loop.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.audio import SAMPLE_RATE

WINDOW = 512
"""Samples per decision (32 ms): the only window Silero's 16 kHz network takes."""
CONTEXT = 64
"""Samples of the previous window the network sees before each window."""
WINDOW_S = WINDOW / SAMPLE_RATE

ROW_WINDOWS = 938
"""A file of more than two of these (30 s each) is cut into rows decoded as one batch, because a batch
of windows costs far less than stepping them one by one (docs/PERF.md, "Audio and VAD")."""
MAX_ROWS = 32
WARMUP_WINDOWS = 32
"""Each row after the first starts this much (1 s) early so its recurrent state has settled on the audio
before the windows it answers for; the overlap's answers are dropped."""

_lock = threading.Lock()
_network: Any = None


def network() -> Any:
    """The shared TorchScript network, loaded once per process on first use."""
    global _network
    with _lock:
        if _network is None:
            threads = torch.get_num_threads()
            try:
                from silero_vad import load_silero_vad  # heavy: only once a detector is needed

                _network = load_silero_vad(onnx=False)._model
            finally:
                # Importing silero_vad sets torch's global thread count to 1, which would slow the model worker.
                torch.set_num_threads(threads)
    return _network


def _run(windows: torch.Tensor, context: torch.Tensor, state: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Probabilities of `windows` [steps, rows, WINDOW], each row carrying its context and recurrent state."""
    net = network()
    out = np.empty((windows.shape[0], windows.shape[1]), np.float32)
    threads = torch.get_num_threads()
    # One thread: on more, thread wake-ups cost more than this small network's matmuls (docs/PERF.md).
    # With torch's OpenMP backend (its Linux wheels) the count is per calling thread, so the model
    # worker keeps its own.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for step in range(windows.shape[0]):
                x = torch.cat([context, windows[step]], dim=1)
                probs, state = net(x, state)
                out[step] = probs[:, 0].numpy()
                context = windows[step][:, -CONTEXT:]
    finally:
        torch.set_num_threads(threads)
    return out, state


@dataclass
class VadStream:
    """One live stream: the network's state and the samples short of a full window."""

    context: torch.Tensor = field(default_factory=lambda: torch.zeros(1, CONTEXT))
    state: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 1, 128))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities of the full windows completed by `samples` (in order; a partial one waits)."""
        return push_many([self], [samples])[0]


def push_many(streams: list[VadStream], chunks: list[np.ndarray]) -> list[np.ndarray]:
    """`VadStream.push` for several streams at once (each at most once): their windows run as rows of one
    batch, a step per window, which costs far less than a call per stream (docs/PERF.md)."""
    joined = [
        np.concatenate([s.pending, c.astype(np.float32, copy=False)]) for s, c in zip(streams, chunks, strict=True)
    ]
    counts = [j.shape[0] // WINDOW for j in joined]
    steps = max(counts, default=0)
    windows = torch.zeros(len(streams), steps, WINDOW)
    for row, (stream, audio, count) in enumerate(zip(streams, joined, counts, strict=True)):
        windows[row, :count] = torch.from_numpy(audio[: count * WINDOW].copy()).reshape(count, WINDOW)
        stream.pending = audio[count * WINDOW :].copy()
    if steps == 0:
        return [np.zeros(0, np.float32) for _ in streams]
    context = torch.cat([s.context for s in streams])
    state = torch.cat([s.state for s in streams], dim=1)
    probs = _steps(windows, torch.tensor(counts), context, state)
    for row, stream in enumerate(streams):
        stream.context, stream.state = context[row : row + 1].clone(), state[:, row : row + 1].clone()
    return [probs[row, :count].numpy().copy() for row, count in enumerate(counts)]


def _steps(windows: torch.Tensor, counts: torch.Tensor, context: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Run each row's windows in order; a row with fewer windows sits out the later steps (its state kept).
    `context` and `state` are updated in place."""
    net, probs = network(), torch.zeros(windows.shape[0], windows.shape[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see `_run`
    try:
        with torch.inference_mode():
            for step in range(windows.shape[1]):
                rows = torch.nonzero(counts > step).flatten()
                x = torch.cat([context[rows], windows[rows, step]], dim=1)
                out, state[:, rows] = net(x, state[:, rows])
                probs[rows, step] = out[:, 0]
                context[rows] = windows[rows, step, -CONTEXT:]
    finally:
        torch.set_num_threads(threads)
    return probs


def file_probabilities(audio: np.ndarray) -> np.ndarray:
    """One probability per window of a whole file (the last window zero-padded). Up to 60 s it is one
    stream, as `VadStream` would give; longer files run as up to 32 rows of one batch."""
    count = math.ceil(audio.shape[0] / WINDOW)
    if count == 0:
        return np.zeros(0, np.float32)
    frames = np.zeros(count * WINDOW, np.float32)
    frames[: audio.shape[0]] = audio
    rows = max(1, min(MAX_ROWS, count // ROW_WINDOWS - 1))
    span = math.ceil(count / rows)
    warm = WARMUP_WINDOWS if rows > 1 else 0
    padded = np.zeros((warm + rows * span) * WINDOW, np.float32)
    padded[warm * WINDOW : (warm + count) * WINDOW] = frames  # row 0's warm-up is silence
    steps = np.stack([padded[r * span * WINDOW : (r * span + warm + span) * WINDOW] for r in range(rows)])
    windows = torch.from_numpy(steps.reshape(rows, warm + span, WINDOW).transpose(1, 0, 2).copy())
    probs, _ = _run(windows, torch.zeros(rows, CONTEXT), torch.zeros(2, rows, 128))
    return np.ascontiguousarray(probs[warm:].T).reshape(-1)[:count]


def speech_spans(
    probs: np.ndarray, length: int, threshold: float, min_silence_ms: int, max_speech_s: float
) -> list[tuple[int, int]]:
    """Sample ranges of speech, by Silero's own rule (`get_speech_timestamps_from_probs`): speech starts at a
    window at or over `threshold`, ends after `min_silence_ms` under `threshold - 0.15`, lasts at least
    MIN_SPEECH_MS, and a stretch longer than `max_speech_s` is cut in its longest inner silence."""
    network()  # imports silero_vad with the thread count kept
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    spans = get_speech_timestamps_from_probs(
        [float(p) for p in probs],
        sampling_rate=SAMPLE_RATE,
        threshold=threshold,
        min_speech_duration_ms=MIN_SPEECH_MS,
        max_speech_duration_s=max_speech_s,
        min_silence_duration_ms=min_silence_ms,
        speech_pad_ms=0,
        audio_length_samples=length,
    )
    return [(int(s["start"]), int(s["end"])) for s in spans]


MIN_SPEECH_MS = 250
"""Shorter bursts (a click, a cough) are not speech."""
