"""Speech under noise through the real server: verbose_json segments (the pieces Silero VAD cut) leave the
noise-only stretches out and start and end within half a second of the speech, at 10 and 0 dB SNR."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.support.speech_layout import Layout, with_noise

RNG = np.random.default_rng(0)


def segments(http: httpx.Client, audio: np.ndarray) -> list[dict[str, Any]]:
    buffer = io.BytesIO()
    sf.write(buffer, audio, 16000, format="WAV", subtype="FLOAT")
    files = {"file": ("noisy.wav", buffer.getvalue())}
    response = http.post(
        "/v1/audio/transcriptions", files=files, data={"model": "tiny", "response_format": "verbose_json"}
    )
    assert response.status_code == 200, response.text
    return list(response.json()["segments"])


@pytest.mark.parametrize("snr_db", [10.0, 0.0])
def test_segments_skip_noise_and_bracket_the_speech(http: httpx.Client, layout: Layout, snr_db: float) -> None:
    found = segments(http, with_noise(layout.audio, snr_db, RNG))
    assert found, "the tiny model writes text for every piece it is given"
    for a, b in layout.silent:  # no segment spans more than ~1 s of a stretch without speech
        assert all(min(b, s["end"]) - max(a, s["start"]) <= 1.0 for s in found), (a, b, found)
    (jfk_start, _), (fr_start, fr_end) = layout.speech
    assert abs(found[0]["start"] - jfk_start) <= 0.5 and abs(found[-1]["end"] - fr_end) <= 0.5, found
    assert any(abs(s["start"] - fr_start) <= 0.5 for s in found), found  # the 4 s of noise between is a cut
