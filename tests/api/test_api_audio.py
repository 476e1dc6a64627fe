"""Transcription and translation through the official openai SDK against the real server."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf

from tests.support.audio_fixtures import CLIP_NAMES, clip_bytes
from tests.support.checks import assert_openai_error
from tests.support.server import AUDIO


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_every_clip_transcribes(client: Any, name: str) -> None:
    result = client.audio.transcriptions.create(model="tiny", file=(name, clip_bytes(name)))
    assert isinstance(result.text, str) and result.text.strip()


def test_json_has_usage_counted_from_tokens(http: Any) -> None:
    with open(AUDIO / "jfk.wav", "rb") as f:
        r = http.post("/v1/audio/transcriptions", files={"file": ("jfk.wav", f)}, data={"model": "tiny"})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # 11 s of audio pads to one 30 s window = 375 audio tokens, plus the control tokens.
    assert usage["type"] == "tokens" and usage["input_tokens"] > 375
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_text_format_and_language(client: Any) -> None:
    with open(AUDIO / "jfk.wav", "rb") as f:
        text = client.audio.transcriptions.create(model="tiny", file=f, response_format="text", language="en")
    assert isinstance(text, str) and text.strip()
    assert not text.startswith("lang:")


def test_transcription_is_deterministic_at_temperature_zero(client: Any) -> None:
    texts = set()
    for _ in range(2):
        with open(AUDIO / "jfk.wav", "rb") as f:
            texts.add(client.audio.transcriptions.create(model="tiny", file=f, language="en").text)
    assert len(texts) == 1


def test_language_changes_prompt_and_output(client: Any) -> None:
    outs = {}
    for lang in ("en", "fr"):
        with open(AUDIO / "jfk.wav", "rb") as f:
            outs[lang] = client.audio.transcriptions.create(model="tiny", file=f, language=lang).text
    assert outs["en"] != outs["fr"]


def test_unknown_fields_are_ignored(http: Any) -> None:
    with open(AUDIO / "jfk.wav", "rb") as f:
        r = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("jfk.wav", f)},
            data={"model": "tiny", "seed": "3", "whatever": "x", "timestamp_granularities[]": "segment"},
        )
    assert r.status_code == 200, r.text


def test_translation(client: Any) -> None:
    with open(AUDIO / "speech_fr.wav", "rb") as f:
        result = client.audio.translations.create(model="tiny", file=f)
    assert isinstance(result.text, str)


def _wav_bytes(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


BAD_FILES = {
    "empty": b"",
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
    "truncated": _wav_bytes()[:40],
    "header_only": _wav_bytes()[:44],
    "forged_rate": _wav_bytes()[:24] + struct.pack("<I", 2**31 - 1) + _wav_bytes()[28:],
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_audio_is_a_400_and_server_keeps_serving(http: Any, client: Any, kind: str) -> None:
    r = http.post("/v1/audio/transcriptions", files={"file": ("x.wav", BAD_FILES[kind])}, data={"model": "tiny"})
    error = assert_openai_error(r, 400)
    assert error["type"] == "invalid_request_error"
    with open(AUDIO / "jfk.wav", "rb") as f:
        assert client.audio.transcriptions.create(model="tiny", file=f).text


def test_unknown_model_is_404(client: Any) -> None:
    with open(AUDIO / "jfk.wav", "rb") as f, pytest.raises(openai.NotFoundError) as info:
        client.audio.transcriptions.create(model="gpt-4o-transcribe", file=f)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_speech_synthesis_is_a_404_naming_what_is_served(http: Any, client: Any) -> None:
    error = assert_openai_error(
        http.post("/v1/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "a"}), 404
    )
    assert error["type"] == "invalid_request_error" and "POST /v1/audio/speech" in error["message"]
    assert "does not synthesise speech" in error["message"] and "/v1/audio/transcriptions" in error["message"]
    with pytest.raises(openai.NotFoundError) as info:
        client.audio.speech.create(model="tts-1", input="hello", voice="alloy")
    assert "does not synthesise speech" in info.value.message
    other = assert_openai_error(http.get("/v1/nowhere"), 404)
    assert other["message"].startswith("Invalid URL (GET /v1/nowhere)") and "/v1/realtime" in other["message"]


def test_missing_file_is_400_not_422(http: Any) -> None:
    assert_openai_error(http.post("/v1/audio/transcriptions", data={"model": "tiny"}), 400)


def test_unsupported_format_is_400(http: Any) -> None:
    with open(AUDIO / "jfk.wav", "rb") as f:
        r = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("jfk.wav", f)},
            data={"model": "tiny", "response_format": "xml"},
        )
    assert_openai_error(r, 400)
