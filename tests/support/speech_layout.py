"""Test audio laid out with known speech and silences (the committed clips, gaps, white noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soundfile as sf

from tests.support.audio_fixtures import DATA

SAMPLE_RATE = 16000


def clip(name: str) -> np.ndarray:
    return np.asarray(sf.read(DATA / name, dtype="float32")[0])


def gap(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def speech_edges(audio: np.ndarray) -> tuple[float, float]:
    """First and last 20 ms frame of a clean clip within 35 dB of its loudest: where its voice is."""
    frames = audio[: audio.shape[0] // 320 * 320].reshape(-1, 320)
    level = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() - 35)
    return loud[0] * 0.02, (loud[-1] + 1) * 0.02


@dataclass
class Layout:
    """2 s lead-in, the JFK clip, 4 s without speech, a French sentence, 3 s tail: the issue's 23 s file."""

    audio: np.ndarray
    speech: list[tuple[float, float]]  # where the voice is, in seconds
    silent: list[tuple[float, float]]  # the stretches with no speech at all


def make_layout() -> Layout:
    jfk, fr = clip("jfk.wav"), clip("speech_fr.wav")
    audio = np.concatenate([gap(2.0), jfk, gap(4.0), fr, gap(3.0)])
    jfk_at, fr_at = 2.0, 2.0 + jfk.shape[0] / SAMPLE_RATE + 4.0
    (a, b), (c, d) = speech_edges(jfk), speech_edges(fr)
    speech = [(jfk_at + a, jfk_at + b), (fr_at + c, fr_at + d)]
    silent = [(0.0, speech[0][0]), (speech[0][1], speech[1][0]), (speech[1][1], audio.shape[0] / SAMPLE_RATE)]
    return Layout(audio, speech, silent)


def with_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise at `snr_db` under the speech's power, over the whole file (the silences too).
    Each test module passes its own seeded generator, so its draws do not depend on what ran before."""
    power = float(np.mean(audio[np.abs(audio) > 0] ** 2))
    noise = rng.standard_normal(audio.shape[0]) * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)
