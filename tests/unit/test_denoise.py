"""The realtime denoiser (`app.denoise`): it lowers a noise floor, keeps speech, streams like a whole file."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from app.denoise import Denoiser, NoiseReduction, denoise
from tests.support.server import AUDIO

NOISE_DROP: dict[str, float] = {"far_field": 100.0, "near_field": 20.0}
"""Least factor by which each type lowers the energy of white noise alone (20 and 13 dB)."""
SPEECH_TOLERANCE = 0.3
"""Clean speech keeps its energy within this fraction."""


def speech() -> np.ndarray:
    return np.asarray(sf.read(AUDIO / "speech_en.wav", dtype="float32")[0])


def white(seconds: float, rms: float) -> np.ndarray:
    noise = np.random.default_rng(1).standard_normal(int(seconds * 16000)).astype(np.float32)
    return noise * np.float32(rms / np.sqrt(np.mean(noise**2)))


@pytest.mark.parametrize("kind", ["near_field", "far_field"])
def test_the_noise_floor_drops_and_speech_keeps_its_energy(kind: NoiseReduction) -> None:
    noise = white(3.0, 0.03)
    assert np.mean(noise**2) / np.mean(denoise(noise, kind) ** 2) >= NOISE_DROP[kind]
    clean = speech()
    ratio = np.mean(denoise(clean, kind) ** 2) / np.mean(clean**2)
    assert abs(ratio - 1) <= SPEECH_TOLERANCE, ratio


def test_noisy_speech_comes_closer_to_the_clean_speech() -> None:
    clean = speech()
    noisy = clean + white(clean.shape[0] / 16000, float(np.sqrt(np.mean(clean**2) / 10)))  # 10 dB SNR
    error_before = np.mean((noisy - clean) ** 2)
    error_after = np.mean((denoise(noisy, "far_field") - clean) ** 2)  # same timeline: no delay to undo
    assert error_after <= error_before / 2, (error_before, error_after)


@pytest.mark.parametrize("append", [7, 160, 320, 4800])
def test_a_stream_pushed_in_chunks_gives_the_whole_clips_output_at_most_32_ms_late(append: int) -> None:
    clean = speech()[:16000]
    stream, parts = Denoiser("near_field"), []
    for at in range(0, clean.shape[0], append):  # appends of 7 samples to 300 ms
        parts.append(stream.push(clean[at : at + append]))
        assert min(clean.shape[0], at + append) - sum(p.shape[0] for p in parts) <= 511
    parts.append(stream.flush())
    assert np.array_equal(np.concatenate(parts), denoise(clean, "near_field"))
    assert stream.push(clean[:1024]).shape[0] == 1024 - 256  # flushed: it starts afresh
