"""What realtime `noise_reduction` (`app.denoise`, GTCRN) does to speech in noise, and what it costs.

Each clip of tests/data (1 s of silence, the speech, 1 s of silence) gets white or pink noise added at 0 and
10 dB SNR (against the speech's own power). Silero's probabilities (`app.vad.file_probabilities`) are taken
on the clean clip, the noisy one, and the noisy one through the denoiser (near_field, far_field, pushed in
20 ms appends as a session does). Per condition, summed over the clips:

- `speech`: windows at or over 0.5 (server_vad's default threshold); `clean` has the clean clips' count.
- `missed` / `extra`: windows the clean clip has as speech and this one not, and the other way round.
- `pieces`: Silero's speech spans (`app.vad.speech_spans`, 500 ms of silence ends one), the clean clips' in
  `clean`; `start` / `end`: mean distance in ms of the first span's start and last span's end from the clean
  clip's.
- `cpu`: CPU seconds per second of audio of the denoiser (`time.process_time`, this process).

    python bench/denoise.py
    python bench/denoise.py --clips speech_en,jfk
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import vad  # noqa: E402
from app.denoise import Denoiser, NoiseReduction  # noqa: E402

RATE = 16000
APPEND = 320  # 20 ms


def noise(kind: str, length: int, seed: int) -> np.ndarray:
    """Unit-power white noise, or pink (1/f power) made from it through its spectrum."""
    white = np.random.default_rng(seed).standard_normal(length)
    if kind == "pink":
        spectrum = np.fft.rfft(white)
        spectrum[1:] /= np.sqrt(np.arange(1, spectrum.shape[0]))
        spectrum[0] = 0
        white = np.fft.irfft(spectrum, length)
    out: np.ndarray = (white / np.sqrt(np.mean(white**2))).astype(np.float32)
    return out


def streamed(audio: np.ndarray, kind: NoiseReduction) -> tuple[np.ndarray, float]:
    """`audio` through one denoiser stream in 20 ms appends, and its CPU seconds."""
    stream, parts = Denoiser(kind), []
    start = time.process_time()
    for at in range(0, audio.shape[0], APPEND):
        parts.append(stream.push(audio[at : at + APPEND]))
    parts.append(stream.flush())
    return np.concatenate(parts), time.process_time() - start


def spans(audio: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    probs = vad.file_probabilities(audio)
    return probs >= 0.5, vad.speech_spans(probs, audio.shape[0], 0.5, 500, 30.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", default="speech_en,speech_fr,speech_de,jfk")
    args = parser.parse_args()
    clips = []
    for name in args.clips.split(","):
        speech = np.asarray(sf.read(ROOT / "tests" / "data" / f"{name}.wav", dtype="float32")[0])
        clips.append((np.concatenate([np.zeros(RATE, np.float32), speech, np.zeros(RATE, np.float32)]), speech))
    seconds = sum(c.shape[0] for c, _ in clips) / RATE
    Denoiser("far_field").push(np.zeros(1024, np.float32))  # loads the model
    clean = [spans(c) for c, _ in clips]
    print(
        f"{len(clips)} clips, {seconds:.1f} s; clean: {sum(int(s.sum()) for s, _ in clean)} speech windows, "
        f"{sum(len(p) for _, p in clean)} pieces"
    )
    print(
        f"{'noise':6} {'SNR':>4} {'denoiser':10} {'speech':>6} {'missed':>6} {'extra':>5} {'pieces':>6} "
        f"{'start ms':>8} {'end ms':>7} {'cpu':>6}"
    )
    for color in ("white", "pink"):
        for snr in (0.0, 10.0):
            noisy = []
            for index, (audio, speech) in enumerate(clips):
                power = float(np.mean(speech**2)) / 10 ** (snr / 10)
                noisy.append(audio + noise(color, audio.shape[0], index) * np.float32(np.sqrt(power)))
            for kind in (None, "near_field", "far_field"):
                row(color, snr, kind, noisy, clean, seconds)


def row(
    color: str,
    snr: float,
    kind: NoiseReduction | None,
    noisy: list[np.ndarray],
    clean: list[tuple[np.ndarray, list[tuple[int, int]]]],
    seconds: float,
) -> None:
    speech = missed = extra = pieces = 0
    starts, ends, cpu = [], [], 0.0
    for audio, (clean_speech, clean_pieces) in zip(noisy, clean, strict=True):
        if kind is not None:
            audio, spent = streamed(audio, kind)
            cpu += spent
        found, got = spans(audio)
        speech += int(found.sum())
        missed += int((clean_speech & ~found).sum())
        extra += int((found & ~clean_speech).sum())
        pieces += len(got)
        if got and clean_pieces:
            starts.append(abs(got[0][0] - clean_pieces[0][0]) * 1000 / RATE)
            ends.append(abs(got[-1][1] - clean_pieces[-1][1]) * 1000 / RATE)
    start = f"{np.mean(starts):8.0f}" if starts else f"{'-':>8}"
    end = f"{np.mean(ends):7.0f}" if ends else f"{'-':>7}"
    print(
        f"{color:6} {snr:4.0f} {kind or 'off':10} {speech:6d} {missed:6d} {extra:5d} {pieces:6d} {start} {end} "
        f"{cpu / seconds:6.3f}"
    )


if __name__ == "__main__":
    main()
