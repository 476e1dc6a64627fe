"""Bad input, through HTTP, in one table: every case gets the right status in OpenAI's error shape with a
message a person understands, and the server answers a normal request right after.

The corpus is built here, in memory, from the shared jfk clip and synthetic audio: nothing is read from
or written to the tree. The unit tests of `app.audio` go deeper into the decoder; this file proves the
whole path (multipart/JSON parsing, limits, decoding, error mapping) holds for each kind of bad input.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf

from app.model.compute.loader import LoadedModel
from tests.support.audio_fixtures import clip_bytes, video_only
from tests.support.checks import assert_openai_error
from tests.support.server import RunningServer, serve

LIMIT_AUDIO_S = 20
"""--max-transcription-audio-s and --max-chat-audio-s of the limited server."""
LIMIT_UPLOAD_MB = 1
"""--max-upload-mb of the limited server (its JSON body limit is 4/3 of it plus 1 MB, for base64)."""
UNICODE = "Grüße 🎙️ 中文 العربية עברית \u202eRTL\u202c z\u0301 \U0001f600 \ufeff\u200b नमस्ते"
"""Accents, emoji (astral plane), CJK, both right-to-left scripts, a BiDi override, combining marks, BOM, ZWSP."""


# --- the corpus -------------------------------------------------------------------------------------


def wav(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate), dtype=np.float32) / rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t, dtype=np.float32)
    return mono if channels == 1 else np.repeat(mono[:, None], channels, axis=1)


ONE_SECOND = wav(tone(1.0))


def forge_wav(*, rate: int | None = None, channels: int | None = None, data_bytes: int | None = None) -> bytes:
    """ONE_SECOND with its fmt chunk's sample rate / channel count or its data chunk's size overwritten."""
    forged = bytearray(ONE_SECOND)
    fmt, data = forged.find(b"fmt "), forged.find(b"data")
    if channels is not None:
        struct.pack_into("<H", forged, fmt + 10, channels)
    if rate is not None:
        struct.pack_into("<I", forged, fmt + 12, rate)
    if data_bytes is not None:
        struct.pack_into("<I", forged, data + 4, data_bytes)
    return bytes(forged)


def flac_with_rate(rate: int) -> bytes:
    """A FLAC whose STREAMINFO claims `rate` Hz (a 20-bit field, so at most 1 048 575)."""
    forged = bytearray(wav(tone(1.0), fmt="FLAC"))
    offset = 8 + 10
    packed = int.from_bytes(forged[offset : offset + 8], "big")
    packed = (packed & ((1 << 44) - 1)) | (rate << 44)
    forged[offset : offset + 8] = packed.to_bytes(8, "big")
    return bytes(forged)


def video_only_mp4() -> bytes:
    """A valid MP4 with one video stream and no audio stream."""
    return video_only("mp4", "mpeg4")


def random_bytes(n: int, seed: int = 7) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SILENCE = clip_bytes("silence_5s.wav")


# --- how a case is sent -----------------------------------------------------------------------------


Send = Callable[[httpx.Client], httpx.Response]


def transcribe(
    file: bytes | None = ONE_SECOND,
    filename: str = "clip.wav",
    path: str = "/v1/audio/transcriptions",
    **fields: Any,
) -> Send:
    data = {"model": "tiny", **fields}

    def send(http: httpx.Client) -> httpx.Response:
        files = {"file": (filename, file, "application/octet-stream")} if file is not None else None
        return http.post(path, files=files, data=data)

    return send


def chat(body: Any = None, *, raw: bytes | None = None, content_type: str = "application/json", **fields: Any) -> Send:
    """A chat request: `body` as JSON (default: a short text question) updated with `fields`, or `raw` bytes."""
    if raw is None:
        payload = body if body is not None else {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        if isinstance(payload, dict):
            payload = {"max_tokens": 2, **payload, **fields}
        raw = json.dumps(payload, ensure_ascii=False, allow_nan=True).encode()

    def send(http: httpx.Client) -> httpx.Response:
        return http.post("/v1/chat/completions", content=raw, headers={"content-type": content_type})

    return send


def audio_chat(part: dict[str, Any], **fields: Any) -> Send:
    return chat({"model": "tiny", "messages": [{"role": "user", "content": [part]}], **fields})


def input_audio(data: str) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def audio_url(url: str) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": url}}


@dataclass(frozen=True)
class Case:
    id: str
    send: Send
    status: int
    code: str | None = None
    """The error's `code`; None: not checked (validation errors of FastAPI's own parsing)."""
    message: str = ""
    """A regex the error message must match (case-insensitive): it says what was wrong."""
    param: str | None = None
    """The error's `param` must start with this, when given."""


def bad_audio(id: str, file: bytes, message: str, filename: str = "clip.wav", code: str = "invalid_audio") -> Case:
    return Case(id, transcribe(file, filename), 400, code, message)


NOT_AUDIO = r"not in a recognised audio format|damaged"

CASES = [
    # -- bodies that are not what the route reads
    Case("transcription-empty-body", lambda h: h.post("/v1/audio/transcriptions"), 400, "invalid_value", "file|model"),
    Case("chat-empty-body", chat(raw=b""), 400, None, "body|json|required"),
    Case("chat-invalid-json", chat(raw=b'{"model": "tiny", "messages": ['), 400, None, "json|decode|body"),
    Case("chat-json-array", chat(raw=b"[1, 2, 3]"), 400, None, "body|object|dict"),
    Case("chat-json-null", chat(raw=b"null"), 400, None, "body|object|dict|required"),
    Case("chat-deeply-nested-json", chat(raw=b"[" * 200_000 + b"]" * 200_000), 400, None, "body|pars|json|object"),
    Case("chat-not-utf8", chat(raw=b'{"model": "\xff\xfe"}'), 400, None, "body|json|decode|utf"),
    Case("chat-text-plain-content-type", chat(content_type="text/plain"), 400, None, "body|object|dict|json"),
    Case(
        "transcription-file-as-text-field",
        lambda h: h.post("/v1/audio/transcriptions", data={"model": "tiny", "file": "not a file"}),
        400,
        "invalid_value",
        "file",
        "file",
    ),
    # -- audio that is not audio, or lies about itself
    bad_audio("empty-file", b"", "empty"),
    bad_audio("random-bytes.wav", random_bytes(20_000), NOT_AUDIO),
    bad_audio("random-bytes.mp3", random_bytes(20_000, 1), NOT_AUDIO, "clip.mp3"),
    bad_audio("random-bytes.m4a", random_bytes(20_000, 2), NOT_AUDIO, "clip.m4a"),
    bad_audio("random-bytes.flac", random_bytes(20_000, 3), NOT_AUDIO, "clip.flac"),
    bad_audio("text-file-as-wav", b"RIFF but really just some text\n" * 50, NOT_AUDIO),
    bad_audio("truncated-wav-mid-header", ONE_SECOND[:30], NOT_AUDIO),
    bad_audio("header-only-wav", ONE_SECOND[:44], "no audio samples"),
    bad_audio("zero-channels-wav", forge_wav(channels=0), "channel|damaged|not in a recognised"),
    bad_audio("65535-channels-wav", forge_wav(channels=65535), "channel|damaged|not in a recognised"),
    *[
        bad_audio(f"wav-rate-{r}", forge_wav(rate=r), "sample rate|not in a recognised")
        for r in (0, 1, 2**31, 2**32 - 1)
    ],
    bad_audio("flac-rate-1048575", flac_with_rate(2**20 - 1), "sample rate", "clip.flac"),
    bad_audio("mp4-without-audio-stream", video_only_mp4(), "no audio stream", "clip.mp4"),
    bad_audio(
        "21s-wav-over-20s-limit", wav(tone(LIMIT_AUDIO_S + 1)), r"21\.0 s .*limit is 20 s", code="audio_too_long"
    ),
    bad_audio(
        "21s-flac-over-20s-limit",
        wav(tone(LIMIT_AUDIO_S + 1), fmt="FLAC"),
        r"limit is 20 s",
        "clip.flac",
        code="audio_too_long",
    ),
    Case(
        "translation-random-bytes",
        transcribe(random_bytes(5000), path="/v1/audio/translations"),
        400,
        "invalid_audio",
        NOT_AUDIO,
    ),
    # -- sizes
    Case("file-over-upload-limit", transcribe(random_bytes(1_600_000)), 413, "payload_too_large", "larger than"),
    Case("body-over-body-limit", transcribe(random_bytes(3_000_000)), 413, "payload_too_large", "larger than"),
    # -- form fields of the wrong type or range
    Case("transcription-temperature-hot", transcribe(temperature="hot"), 400, None, "temperature", "temperature"),
    Case("transcription-temperature-negative", transcribe(temperature="-0.5"), 400, None, "temperature", "temperature"),
    Case("transcription-temperature-nan", transcribe(temperature="nan"), 400, None, "temperature", "temperature"),
    Case("transcription-stream-maybe", transcribe(stream="maybe"), 400, None, "stream", "stream"),
    Case("transcription-unknown-model", transcribe(model="whisper-9000"), 404, "model_not_found", "whisper-9000"),
    Case(
        "translation-unknown-model",
        transcribe(path="/v1/audio/translations", model="nope"),
        404,
        "model_not_found",
        "nope",
    ),
    Case("transcription-unicode-model", transcribe(model=UNICODE), 404, "model_not_found", "does not exist"),
    Case("transcription-unicode-language", transcribe(language=UNICODE), 400, None, "language", "language"),
    Case("transcription-unicode-format", transcribe(response_format=UNICODE), 400, None, "response_format"),
    Case("transcription-unicode-chunking", transcribe(chunking_strategy=UNICODE), 400, None, "chunking_strategy"),
    # -- chat bodies of the wrong type or range
    Case("chat-messages-a-number", chat(messages=42), 400, "invalid_value", "messages", "messages"),
    Case("chat-messages-empty", chat(messages=[]), 400, "invalid_value", "messages", "messages"),
    Case("chat-role-unknown", chat(messages=[{"role": "wizard", "content": "x"}]), 400, None, "role", "messages"),
    Case("chat-temperature-hot", chat(temperature="hot"), 400, "invalid_value", "temperature", "temperature"),
    Case("chat-temperature-negative", chat(temperature=-0.1), 400, "invalid_value", "temperature", "temperature"),
    Case("chat-temperature-nan", chat(temperature=float("nan")), 400, None, "temperature", "temperature"),
    Case("chat-top-p-infinity", chat(top_p=float("inf")), 400, None, "top_p", "top_p"),
    Case("chat-max-tokens-many", chat(max_tokens="many"), 400, "invalid_value", "max_tokens", "max_tokens"),
    Case("chat-max-tokens-zero", chat(max_tokens=0), 400, "invalid_value", "max_tokens", "max_tokens"),
    Case("chat-max-tokens-huge", chat(max_tokens=10**12), 400, "context_length_exceeded", "context", "max_tokens"),
    Case("chat-max-tokens-2**80", chat(max_tokens=2**80), 400, None, "context|max_tokens", "max_tokens"),
    Case("chat-seed-2**80", chat(seed=2**80), 400, None, "seed", "seed"),
    Case("chat-stop-a-number", chat(stop=5), 400, None, "stop", "stop"),
    Case("chat-unknown-model", chat(model="gpt-4o"), 404, "model_not_found", "gpt-4o", "model"),
    Case("chat-unicode-model", chat(model=UNICODE), 404, "model_not_found", "does not exist", "model"),
    # -- chat audio
    Case("chat-bad-base64", audio_chat(input_audio("not base64!!")), 400, "invalid_audio", "base64", "messages"),
    Case("chat-empty-base64", audio_chat(input_audio("")), 400, "invalid_audio", "empty", "messages"),
    Case("chat-unicode-base64", audio_chat(input_audio(UNICODE)), 400, "invalid_audio", "base64", "messages"),
    Case(
        "chat-data-url-wrong-mime",
        audio_chat(audio_url("data:image/png;base64," + b64(ONE_SECOND))),
        400,
        None,
        "MIME|audio/",
        "messages",
    ),
    Case(
        "chat-data-url-not-base64",
        audio_chat(audio_url("data:audio/wav," + "x" * 100)),
        400,
        None,
        "base64",
        "messages",
    ),
    Case("chat-remote-audio-url", audio_chat(audio_url("http://169.254.169.254/a.wav")), 400, None, "data: URL"),
    Case("chat-audio-random-bytes", audio_chat(input_audio(b64(random_bytes(9000)))), 400, "invalid_audio", NOT_AUDIO),
    Case(
        "chat-audio-21s-over-20s-limit",
        audio_chat(input_audio(b64(wav(tone(LIMIT_AUDIO_S + 1, 8000), 8000)))),
        400,
        "audio_too_long",
        "limit is 20 s",
    ),
    Case(
        "chat-nine-audios-over-eight",
        chat({"model": "tiny", "messages": [{"role": "user", "content": [input_audio(b64(ONE_SECOND))] * 9}]}),
        400,
        None,
        "limit is 8",
        "messages",
    ),
    # -- routes and methods that do not exist
    Case("get-unknown-model", lambda h: h.get("/v1/models/gpt-5"), 404, "model_not_found", "gpt-5", "model"),
    Case("unknown-route", lambda h: h.get("/v1/engines"), 404, None, "not found"),
    Case("wrong-method", lambda h: h.get("/v1/chat/completions"), 405, None, "method"),
]

ODD_FIELD_NAMES: dict[str, Any] = {"metadata[x]": "y", "unknown[]": "1", UNICODE: UNICODE}

GOOD = [
    ("eight-channel-48k-wav", transcribe(wav(tone(1.0, 48000, 8), 48000))),
    ("silence-wav", transcribe(SILENCE)),
    ("silence-srt", transcribe(SILENCE, response_format="srt")),
    ("silence-verbose-json", transcribe(SILENCE, response_format="verbose_json")),
    ("silence-chunked-stream", transcribe(SILENCE, stream="true", chunking_strategy="auto")),
    ("silence-chat", audio_chat(input_audio(b64(SILENCE)))),
    ("digital-silence-flac", transcribe(wav(np.zeros(32000, np.float32), fmt="FLAC"), "clip.flac")),
    ("wav-claiming-an-hour-holding-a-second", transcribe(forge_wav(data_bytes=16000 * 2 * 3600))),
    ("wav-claiming-4-GiB-holding-a-second", transcribe(forge_wav(data_bytes=2**32 - 1))),
    ("truncated-wav-mid-data", transcribe(ONE_SECOND[:20_000])),
    ("20s-at-the-limit", transcribe(wav(tone(LIMIT_AUDIO_S, 8000), 8000))),
    ("transcription-unicode-filename-and-prompt", transcribe(filename=f"{UNICODE}.wav", prompt=UNICODE)),
    ("translation-unicode-prompt", transcribe(path="/v1/audio/translations", prompt=UNICODE)),
    (
        "transcription-unknown-fields",
        transcribe(seed="3", whatever="x", **ODD_FIELD_NAMES),
    ),
    (
        "chat-unicode-in-every-text-field",
        chat(
            {
                "model": "tiny",
                "messages": [
                    {"role": "system", "content": UNICODE, "name": "sys"},
                    {"role": "user", "content": [{"type": "text", "text": UNICODE}], "name": "u_1"},
                    {"role": "assistant", "content": UNICODE},
                    {"role": "user", "content": UNICODE},
                ],
                "stop": [UNICODE, "\x00"],
                "user": UNICODE,
                UNICODE: UNICODE,
            }
        ),
    ),
    (
        "chat-unknown-fields-everywhere",
        chat(
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
                            {"type": "input_audio", "input_audio": {"data": b64(ONE_SECOND), "format": "wav", "x": 1}},
                        ],
                        "future_field": [1, 2],
                    }
                ],
                "store": True,
                "metadata": {"a": "b"},
                "service_tier": "auto",
                "reasoning_effort": "low",
                "modalities": ["text"],
            }
        ),
    ),
    ("chat-data-url-octet-stream", audio_chat(audio_url("data:application/octet-stream;base64," + b64(ONE_SECOND)))),
]


# --- the tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(
        loaded,
        tiny_dir,
        max_upload_mb=LIMIT_UPLOAD_MB,
        max_transcription_audio_s=LIMIT_AUDIO_S,
        max_chat_audio_s=LIMIT_AUDIO_S,
        transcription_min_tokens=2,
        transcription_tokens_per_audio_s=0.5,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def lhttp(limited: RunningServer) -> Iterator[httpx.Client]:
    with limited.http() as client:
        yield client


def assert_still_serving(http: httpx.Client) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 1}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


def assert_readable(message: str) -> None:
    """What a person can act on: a sentence, not a stack trace, a repr or a wall of bytes."""
    assert 5 <= len(message) <= 600, message
    for leak in ("Traceback", 'File "', "object at 0x", "<class", "Errno", "\\x"):
        assert leak not in message, message


KNOWN_BUGS: dict[str, str] = {}


def with_known_bugs(cases: list[Case]) -> list[Any]:
    marks = {id: pytest.mark.xfail(strict=True, reason=reason) for id, reason in KNOWN_BUGS.items()}
    return [pytest.param(c, id=c.id, marks=[marks[c.id]] if c.id in marks else []) for c in cases]


@pytest.mark.parametrize("case", with_known_bugs(CASES))
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(case: Case, lhttp: httpx.Client) -> None:
    error = assert_openai_error(case.send(lhttp), case.status)
    assert error["type"] == "invalid_request_error", error
    if case.code is not None:
        assert error["code"] == case.code, error
    assert re.search(case.message, error["message"], re.IGNORECASE), error
    if case.param is not None:
        assert error["param"] and error["param"].startswith(case.param), error
    assert_readable(error["message"])
    assert_still_serving(lhttp)


@pytest.mark.parametrize(("name", "send"), GOOD, ids=[g[0] for g in GOOD])
def test_odd_but_valid_input_succeeds(name: str, send: Send, lhttp: httpx.Client) -> None:
    response = send(lhttp)
    assert response.status_code == 200, response.text
    kind = response.headers["content-type"].split(";")[0]
    if kind == "application/json":
        body = response.json()
        assert isinstance(body.get("text", body.get("choices")), str | list), body
    elif kind == "text/event-stream":
        assert '"transcript.text.done"' in response.text and '"error"' not in response.text, response.text
    else:
        assert kind.startswith("text/"), kind


def test_the_corpus_covers_every_kind_of_bad_input() -> None:
    """The issue's list, each kind present in the table (so a trimmed table cannot pass silently)."""
    ids = {c.id for c in CASES} | {g[0] for g in GOOD}
    wanted = [
        "empty-body", "random-bytes", "truncated", "header-only", "claiming", "zero-channels", "-rate-",
        "without-audio-stream", "eight-channel-48k", "silence", "over-20s", "over-upload-limit", "bad-base64",
        "wrong-mime", "temperature-hot", "messages-a-number", "max-tokens-huge", "temperature-negative",
        "unknown-model", "unicode", "unknown-fields",
    ]  # fmt: skip
    missing = [w for w in wanted if not any(w in i for i in ids)]
    assert not missing, missing


# --- a 50 MB JSON body ------------------------------------------------------------------------------


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def fifty_mb_chat() -> bytes:
    filler = "A" * (50 * 2**20)
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": filler}]}).encode()


def test_50_mb_json_body_is_refused_at_once_without_being_read(http: httpx.Client) -> None:
    """Content-Length says 50 MB: 413 before a byte of the body is read (default limits: 25 MB uploads)."""
    body = fifty_mb_chat()
    before, started = rss(), time.monotonic()
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    elapsed, grown = time.monotonic() - started, rss() - before
    error = assert_openai_error(response, 413)
    assert error["code"] == "payload_too_large" and "larger than" in error["message"]
    assert elapsed < 5, elapsed
    assert grown < 25 * 2**20, f"server RSS grew {grown / 2**20:.0f} MB"
    assert_still_serving(http)


def test_50_mb_chunked_json_body_is_cut_off_once_past_the_limit(lhttp: httpx.Client) -> None:
    """No Content-Length: the server counts while reading and stops at its limit (about 2.3 MB here)."""
    body, pulled = fifty_mb_chat(), 0

    def chunks() -> Iterator[bytes]:
        nonlocal pulled
        for start in range(0, len(body), 64 * 1024):
            pulled += 64 * 1024
            yield body[start : start + 64 * 1024]

    before = rss()
    response = lhttp.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    grown = rss() - before
    error = assert_openai_error(response, 413)
    assert error["code"] == "payload_too_large"
    assert pulled < 40 * 2**20, f"the client got to send {pulled / 2**20:.0f} MB"
    assert grown < 25 * 2**20, f"server RSS grew {grown / 2**20:.0f} MB"
    assert_still_serving(lhttp)
