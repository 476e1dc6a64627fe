"""Whisper log-mel features, computed by the model worker on the model's device.

Why in the worker, not in the request threads: on a GPU the STFT of a whole batch costs a few
kernel launches instead of milliseconds of CPU per request; on a CPU, torch ops in several threads
at once each start an OpenMP team and oversubscribe the cores the model needs
(docs/PERF.md#model-features).

Why not `WhisperFeatureExtractor` itself: it pads every audio with zeros to a multiple of 30 s
and runs the STFT over all of it, behind generic list and padding code. A frame whose 400-sample
window lies wholly in zeros has a spectrum of exactly zero, so only frames that touch the audio are
transformed and projected onto the mel bands; the log, clamp and scaling run on the full-size tensor
with the reference's shapes and kernels.

Equal to the extractor within float32 rounding, not bit for bit: the STFT and the projection run
over fewer frames than the reference's, and BLAS and FFT libraries pick their kernels (and so the
order of their sums) by shape and CPU. On AVX-512 the projection of a handful of frames (audio under
~600 samples) lands one ulp (1.2e-7) away on a few values. Tests hold it to atol 1e-5 on the log-mel
scale (values within about [-1.5, 2.5]): 80 ulps, still a 1e-4 relative change of a band's power,
far below anything that moves the model (bfloat16 alone rounds a feature by 4e-3). Extractors this
does not model (dither, normalisation) take the reference path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from app.model.compute.transfer import upload

_SCAN_BLOCK = 32_768


class LogMel:
    """`WhisperFeatureExtractor`'s log-mel, minus the FFTs of the zero padding."""

    def __init__(self, feature_extractor: Any, frames_per_chunk: int, device: torch.device | str = "cpu") -> None:
        self.reference = feature_extractor
        self.device = torch.device(device)
        self.n_fft = int(feature_extractor.n_fft)
        self.hop = int(feature_extractor.hop_length)
        self.frames_per_chunk = frames_per_chunk
        self.chunk_samples = frames_per_chunk * self.hop
        # (freq, mel), used transposed exactly as the reference does: a contiguous copy of the
        # transpose would take another GEMM path and change the last bits.
        self.filters = torch.from_numpy(np.asarray(feature_extractor.mel_filters)).to(torch.float32).to(self.device)
        self.window = torch.hann_window(self.n_fft, device=self.device)
        self.exact = float(getattr(feature_extractor, "dither", 0.0)) == 0.0 and not bool(
            getattr(feature_extractor, "do_normalize", False)
        )

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """(n_chunks, n_mels, frames_per_chunk) for one mono 16 kHz float32 array."""
        with torch.inference_mode():
            mel = self._fast(audio) if self.exact else self._reference(audio).to(self.device)
        return mel.reshape(mel.shape[0], -1, self.frames_per_chunk).transpose(0, 1)

    def batch(self, audios: list[np.ndarray]) -> torch.Tensor:
        """The windows of every audio, in order: (total chunks, n_mels, frames_per_chunk).

        Audio by audio: one STFT and projection over a whole batch was slower per row on CPU, its tensors
        falling out of cache (docs/PERF.md#model-features)."""
        return torch.cat([self(audio) for audio in audios])

    def _reference(self, audio: np.ndarray) -> torch.Tensor:
        out = self.reference(
            audio,
            sampling_rate=self.reference.sampling_rate,
            padding=True,
            truncation=False,
            pad_to_multiple_of=self.chunk_samples,
            return_tensors="pt",
        )["input_features"]
        return torch.as_tensor(out[0])

    def _fast(self, audio: np.ndarray) -> torch.Tensor:
        padded = max(1, -(-len(audio) // self.chunk_samples)) * self.chunk_samples
        frames = padded // self.hop
        n = _length_without_trailing_zeros(audio)
        # Frame k of the centred, reflect-padded STFT sees samples [k*hop - n_fft/2, k*hop + n_fft/2).
        # Frames up to `touched` can see the audio, later ones only zeros. A waveform of n + n_fft
        # samples gives the same windows for every frame up to `touched`, reflect padding at its
        # end included, because its tail is zeros too.
        touched = min(frames, (n + self.n_fft // 2 - 1) // self.hop + 1)
        waveform = torch.zeros(min(padded, n + self.n_fft), dtype=torch.float32, device=self.device)
        waveform[:n] = upload(torch.from_numpy(np.ascontiguousarray(audio[:n], dtype=np.float32)), self.device)
        stft = torch.stft(waveform, self.n_fft, self.hop, window=self.window, return_complex=True)
        # The projection of an all-zero frame is exactly zero: project only the touched frames (a
        # narrower GEMM may sum in another order than the reference's: equal within rounding only).
        mel = torch.zeros(self.filters.shape[1], frames, dtype=torch.float32, device=self.device)
        mel[:, :touched] = self.filters.T @ (stft[:, :touched].abs() ** 2)
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


def _length_without_trailing_zeros(audio: np.ndarray) -> int:
    """Audio usually arrives padded to 30 s (mistral-common pads it); trailing zeros are padding
    whoever added them. Scanned in blocks from the end, cheaper than a whole-array `flatnonzero`."""
    end = len(audio)
    while end > 0:
        start = max(0, end - _SCAN_BLOCK)
        block = audio[start:end]
        if block.any():
            return start + int(np.flatnonzero(block)[-1]) + 1
        end = start
    return 0
