"""The audio tests use: clips committed in tests/data/ (see its README) and audio made here, from
those clips or from nothing (silence, other rates, Opus bombs), so no test reads outside the repository."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from app.audio import AudioLimits, decode_audio

DATA = Path(__file__).resolve().parents[1] / "data"
"""Committed clips: jfk.* in six containers, speech_XX.wav in eight languages, speech_texts.tsv."""
JFK = decode_audio((DATA / "jfk.wav").read_bytes(), AudioLimits(max_seconds=60))
"""The JFK clip as the server decodes it: float32 mono 16 kHz."""


def wav(samples: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def resampled(samples: np.ndarray, rate_from: int, rate_to: int) -> np.ndarray:
    """Ideal band-limited resampling by zero-padding or truncating the spectrum: independent of the
    soxr resampler the server uses, so a test comparing the two is not comparing soxr with itself."""
    n = len(samples)
    m = round(n * rate_to / rate_from)
    spectrum = np.fft.rfft(samples.astype(np.float64))
    bins = m // 2 + 1
    spectrum = spectrum[:bins] if bins <= len(spectrum) else np.pad(spectrum, (0, bins - len(spectrum)))
    return (np.fft.irfft(spectrum, m) * (m / n)).astype(np.float32)


def wav_b64(audio: np.ndarray) -> str:
    """Float WAV in base64, as a chat request's audio part carries it."""
    return base64.b64encode(wav(audio, subtype="FLOAT")).decode()


def jfk_samples() -> np.ndarray:
    samples, _ = sf.read(DATA / "jfk.wav", dtype="float32")
    return np.asarray(samples, np.float32)


def _jfk_44k_stereo() -> bytes:
    left = np.clip(resampled(jfk_samples(), 16000, 44100), -1.0, 1.0)
    return wav(np.stack([left, 0.8 * left], axis=1), 44100)  # unequal channels: the down-mix is seen


MADE: dict[str, Callable[[], bytes]] = {
    "silence_5s.wav": lambda: wav(np.zeros(5 * 16000, np.float32), subtype="PCM_32"),
    "jfk_8k.wav": lambda: wav(np.clip(resampled(jfk_samples(), 16000, 8000), -1.0, 1.0), 8000),
    "jfk_44k_stereo.wav": _jfk_44k_stereo,
}
"""Clips cheaper to make than to commit (the 44.1 kHz stereo one would be 1.9 MB)."""

CLIP_NAMES = sorted(
    [p.name for p in DATA.iterdir() if p.suffix in {".wav", ".mp3", ".flac", ".ogg", ".webm", ".m4a"}] + list(MADE)
)
"""Every clip by name, committed or made: each decodes, in the container its suffix says."""


def clip_bytes(name: str) -> bytes:
    """A committed clip's bytes, or a made one's."""
    return MADE[name]() if name in MADE else (DATA / name).read_bytes()


def silent_opus(seconds: float, container_format: str) -> bytes:
    """Opus silence, built by muxing one encoded 20 ms packet over and over (cheap even for hours)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="flt", layout="mono")
        frame.sample_rate = 48000
        packets = []
        for index in range(10):
            frame.pts = index * 960
            packets += stream.encode(frame)
        for packet in packets:
            container.mux(packet)
        template = packets[-1]
        pts, step = template.pts or 0, template.duration or 960
        for _ in range(round(seconds * 50) - len(packets)):
            pts += step
            copy = av.Packet(bytes(template))
            copy.pts = copy.dts = pts
            copy.duration, copy.time_base, copy.stream = template.duration, template.time_base, stream
            container.mux(copy)
    return buffer.getvalue()


def video_only(container_format: str = "mp4", codec: str = "mpeg4") -> bytes:
    """A valid container with one short video stream and no audio stream."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=10)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()
