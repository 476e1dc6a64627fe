"""Whether a speaker has finished their turn, from the sound of its last seconds: Smart Turn v3.2
(pipecat-ai's model, BSD-2-Clause, shipped in `app/data/`, see `app/data/NOTICE.md`), a small int8
Whisper-encoder classifier run by onnxruntime on the CPU.

Its input is what pipecat's `LocalSmartTurnAnalyzerV3` feeds it: the last `SECONDS` of 16 kHz audio (zeros
in front when shorter), as Whisper log-mel features (`WhisperFeatureExtractor(chunk_length=8)` with
`do_normalize=True`: the waveform scaled to zero mean and unit variance, 80 bands, 10 ms hop, 800 frames).
Its output is the probability that the turn is complete: prosody and words, not silence, decide it, so
pipecat asks it once a short pause (200 ms) is heard.

One session per process, loaded on first use and shared; each call runs on the calling thread with one
intra-op thread (callers keep it off the event loop: a prep thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from app.audio import SAMPLE_RATE
from app.onnx_models import cpu_session

MODEL = Path(__file__).resolve().parent / "data" / "smart-turn-v3.2-cpu.onnx"
SECONDS = 8
SAMPLES = SECONDS * SAMPLE_RATE
N_FFT, HOP, N_MELS = 400, 160, 80
FRAMES = SAMPLES // HOP  # 800: the extractor drops the STFT's last frame

_filters: np.ndarray | None = None


def session() -> Any:
    """The shared onnxruntime session, loaded once per process."""
    return cpu_session(MODEL)


def mel_filters() -> np.ndarray:
    """(201, 80) Slaney mel filters, as `WhisperFeatureExtractor(feature_size=80)` builds them."""
    global _filters
    if _filters is None:
        from transformers.audio_utils import mel_filter_bank

        _filters = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2,
            num_mel_filters=N_MELS,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
    return _filters


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last SECONDS of `audio`, zero-padded at the front to exactly SAMPLES."""
    tail = np.asarray(audio[-SAMPLES:], np.float32)
    return np.pad(tail, (SAMPLES - tail.shape[0], 0))


def features(audio: np.ndarray) -> np.ndarray:
    """(80, 800) float32 log-mel of `last_window(audio)`: `WhisperFeatureExtractor`'s, within float rounding."""
    x = last_window(audio)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = sliding_window_view(padded, N_FFT)[::HOP][:FRAMES]
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as the extractor's
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    log = np.log10(np.maximum(power @ mel_filters(), 1e-10)).T
    log = np.maximum(log, log.max() - 8.0)
    scaled: np.ndarray = ((log + 4.0) / 4.0).astype(np.float32)
    return scaled


def probabilities(clips: list[np.ndarray]) -> list[float]:
    """P(turn complete) of each clip (16 kHz mono float32 ending where the speaker paused), one batch."""
    if not clips:
        return []
    batch = np.stack([features(clip) for clip in clips])
    out = session().run(None, {"input_features": batch})[0]
    return [float(p) for p in np.asarray(out).reshape(-1)]
