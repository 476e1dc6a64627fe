"""Speech enhancement of a live 16 kHz stream: GTCRN (Rong et al., ICASSP 2024; MIT, its streaming ONNX
export trained on DNS3, shipped in `app/data/`, see `app/data/NOTICE.md`) run by onnxruntime on the CPU.

Why this denoiser: it is a real speech-enhancement network (not a spectral gate tuned by hand), causal by
construction (each STFT frame is enhanced from the frames before it, its recurrent and convolution caches
carried by the caller), tiny (48k parameters, a 0.5 MB file, about 33 MMAC per second of audio), and it
runs under the onnxruntime already pinned for the turn-end model, so it adds no dependency and no network
at run time. `noisereduce` (spectral gating) was the other candidate: it needs the whole signal or a
noise clip (its non-stationary mode smooths the noise floor forwards and backwards in time), and it would
pull scipy and matplotlib into the server.

Framing (the model's own): 512-sample frames, hop 256, a square-root periodic Hann window for analysis
and synthesis (their product overlap-adds to one). A stream starts with 256 zeros so its output sample
`i` is the enhanced input sample `i`: the timeline is kept, and a pushed sample comes out at most
511 samples (32 ms) later. `flush` pads the tail with zeros.

OpenAI's two types map to how much of the original is kept (`DRY`): `far_field` (a laptop or room
microphone: more noise and reverberation) takes the network's output alone; `near_field` (a headset)
adds the original back at -20 dB, which caps the noise suppression near 20 dB and keeps the close voice's
detail that a full mask may shave.

One onnxruntime session per process, loaded on first use and shared (its `run` is thread-safe); each
stream carries its own caches. Every call runs on the calling thread with one intra-op thread: callers
keep it off the event loop (a prep thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.onnx_models import cpu_session

MODEL = Path(__file__).resolve().parent / "data" / "gtcrn-simple.onnx"
FRAME, HOP = 512, 256
NoiseReduction = Literal["near_field", "far_field"]
DRY: dict[str, float] = {"near_field": 0.1, "far_field": 0.0}
"""Amplitude of the original added to the network's output, per type."""
_WINDOW = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / FRAME)).astype(np.float32)


def session() -> Any:
    """The shared onnxruntime session, loaded once per process."""
    return cpu_session(MODEL)


class Denoiser:
    """One stream's enhancement: `push` samples in, the enhanced samples that are complete come out."""

    def __init__(self, kind: NoiseReduction) -> None:
        self.kind = kind
        """May change between pushes (a `session.update`): the next frames use the new type."""
        self._reset()

    def _reset(self) -> None:
        self._input = np.zeros(HOP, np.float32)  # not yet framed: the last frame's second half, then new samples
        self._tail = np.zeros(HOP, np.float32)  # the last frame's output second half, to overlap-add
        self._lead = HOP  # output of the leading zeros still to drop
        self._owed = 0  # samples pushed and not yet returned
        self._caches = {
            "conv_cache": np.zeros((2, 1, 16, 16, 33), np.float32),
            "tra_cache": np.zeros((2, 3, 1, 1, 16), np.float32),
            "inter_cache": np.zeros((2, 1, 33, 16), np.float32),
        }

    def push(self, samples: np.ndarray) -> np.ndarray:
        """The enhanced samples completed by `samples` (in order; the rest wait for the next push)."""
        self._input = np.concatenate([self._input, samples.astype(np.float32, copy=False)])
        count = (self._input.shape[0] - HOP) // HOP
        out = self._frames(count) if count > 0 else np.zeros(0, np.float32)
        self._input = self._input[count * HOP :]
        skip = min(self._lead, out.shape[0])
        self._lead -= skip
        self._owed += samples.shape[0] - (out.shape[0] - skip)
        return out[skip:]

    def flush(self) -> np.ndarray:
        """Everything still held, the stream ended with silence; the denoiser then starts afresh."""
        owed = self._owed
        out = self.push(np.zeros(FRAME, np.float32))[:owed]
        self._reset()
        return out

    def _frames(self, count: int) -> np.ndarray:
        """The output of the first `count` frames of the input, overlap-added to the last push's tail."""
        frames = np.lib.stride_tricks.sliding_window_view(self._input, FRAME)[::HOP][:count]
        spec = np.fft.rfft(frames * _WINDOW, axis=-1)  # every frame's transform at once: only the network steps
        enhanced = np.stack([self._step(row) for row in spec])
        waves = (np.fft.irfft(enhanced + DRY[self.kind] * spec, FRAME, axis=-1) * _WINDOW).astype(np.float32)
        heads = np.concatenate([self._tail[None], waves[:-1, HOP:]])  # each hop: a frame's tail, the next's head
        self._tail = waves[-1, HOP:]
        out: np.ndarray = (heads + waves[:, :HOP]).reshape(-1)
        return out

    def _step(self, spec: np.ndarray) -> np.ndarray:
        """One frame's spectrum through the network (its caches carried to the next)."""
        mix = np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)[None, :, None, :]
        enh, *caches = session().run(None, {"mix": mix, **self._caches})
        self._caches = dict(zip(self._caches, caches, strict=True))
        out: np.ndarray = enh[0, :, 0, 0] + 1j * enh[0, :, 0, 1]
        return out


def denoise(audio: np.ndarray, kind: NoiseReduction) -> np.ndarray:
    """A whole clip enhanced, as one stream (same length)."""
    stream = Denoiser(kind)
    return np.concatenate([stream.push(audio), stream.flush()])
