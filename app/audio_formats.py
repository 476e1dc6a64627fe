"""Streamed input audio of realtime sessions: `audio/pcm` (16-bit little-endian mono at 24 kHz),
`audio/pcmu` (G.711 µ-law, 8 kHz) and `audio/pcma` (G.711 A-law, 8 kHz), decoded chunk by chunk into
16 kHz float32.

G.711 decodes through 256-entry tables (ITU-T G.711, as `audioop` had them); soxr resamples as a stream,
so chunk edges leave no clicks. A byte left over from an odd-length PCM chunk waits for the next one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import soxr

from app.audio import SAMPLE_RATE

AudioFormat = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
RATES: dict[AudioFormat, int] = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.float32) / 32768.0


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (a & 0x70) >> 4
    base = ((a & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    magnitude = np.where(segment > 1, base << np.maximum(segment - 1, 0), base)
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.float32) / 32768.0


ULAW = _ulaw_table()
ALAW = _alaw_table()


class InputDecoder:
    """One session's input stream in one format: bytes in, 16 kHz float32 out."""

    def __init__(self, audio_format: AudioFormat) -> None:
        self.format = audio_format
        self.rate = RATES[audio_format]
        self._carry = b""
        self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def seconds_in(self, size: int) -> float:
        """Seconds of audio `size` bytes of this format hold: known before decoding, the formats are raw."""
        return size / (self.rate * (2 if self.format == "audio/pcm" else 1))

    def push(self, data: bytes) -> np.ndarray:
        samples = self._samples(data)
        return np.asarray(self._resampler.resample_chunk(samples), dtype=np.float32)

    def flush(self) -> np.ndarray:
        """The samples the resampler still holds (its delay: ~20 ms from 24 kHz, ~65 ms from 8 kHz), so a
        manual commit keeps the end of the last word; the stream then starts afresh."""
        tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return np.asarray(tail, dtype=np.float32)

    def _samples(self, data: bytes) -> np.ndarray:
        if self.format == "audio/pcmu":
            return ULAW[np.frombuffer(data, np.uint8)]
        if self.format == "audio/pcma":
            return ALAW[np.frombuffer(data, np.uint8)]
        data, self._carry = self._carry + data, b""
        if len(data) % 2:
            data, self._carry = data[:-1], data[-1:]
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
