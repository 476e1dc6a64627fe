"""Long audio through the real server: cut at silences into pieces that decode as rows of one batch,
streamed in order; upload and duration limits."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from app.model.compute.loader import LoadedModel
from tests.support.checks import assert_openai_error
from tests.support.server import AUDIO, RunningServer, serve

CLIPS = ["jfk.wav", "speech_en.wav", "speech_fr.wav", "speech_de.wav", "speech_es.wav"]


def long_audio(seconds: float) -> bytes:
    """Shared speech clips with 0.4-1.2 s silences between them, as a 16 kHz WAV."""
    rng = np.random.default_rng(1)
    clips = [sf.read(AUDIO / name, dtype="float32")[0] for name in CLIPS]
    parts: list[np.ndarray] = []
    while sum(p.shape[0] for p in parts) < seconds * 16000:
        parts += [clips[len(parts) // 2 % len(clips)], np.zeros(int(16000 * rng.uniform(0.4, 1.2)), np.float32)]
    buffer = io.BytesIO()
    sf.write(buffer, np.concatenate(parts), 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def level_db(audio: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(audio.astype(np.float64) ** 2) + 1e-12))


@pytest.fixture(scope="module")
def eighty() -> bytes:
    return long_audio(80.0)


def post(http: httpx.Client, data: bytes, **form: Any) -> httpx.Response:
    return http.post("/v1/audio/transcriptions", files={"file": ("long.wav", data)}, data={"model": "tiny", **form})


def test_auto_cuts_at_silences_into_pieces_of_at_most_30_s(http: httpx.Client, eighty: bytes) -> None:
    data = eighty
    body = post(http, data, response_format="verbose_json").json()  # verbose_json defaults to auto
    segments = body["segments"]
    assert len(segments) >= 3 and body["duration"] >= 80.0
    assert body["text"] == " ".join(s["text"] for s in segments)
    assert [s["id"] for s in segments] == list(range(len(segments)))
    audio = sf.read(io.BytesIO(data), dtype="float32")[0]
    for a, b in pairwise(segments):
        assert a["end"] <= b["start"]
        for edge in (a["end"] - 0.1, b["start"]):  # no voice on either side of a cut (room noise may be)
            assert level_db(audio[int(edge * 16000) : int((edge + 0.1) * 16000)]) < level_db(audio) - 10, (a, b)
    assert all(0 < s["end"] - s["start"] <= 30.0 and s["seek"] == round(s["start"] * 100) for s in segments)
    assert post(http, data, response_format="json", chunking_strategy="auto").json()["text"] == body["text"]


def test_unset_chunking_is_one_request_over_every_window(http: httpx.Client, eighty: bytes) -> None:
    whole = post(http, eighty).json()
    pieces = post(http, eighty, chunking_strategy="auto").json()
    assert whole["usage"]["input_tokens"] >= 3 * 375  # 80 s: three 30 s windows in one prompt
    assert pieces["usage"]["input_tokens"] > whole["usage"]["input_tokens"]  # one window per piece
    assert whole["text"] != pieces["text"]


def test_pieces_decode_as_rows_of_the_same_batch(server: RunningServer, http: httpx.Client, eighty: bytes) -> None:
    rows: list[int] = []
    generator = server.generator
    generator.fault = lambda stage, items: rows.append(len(items)) if stage == "step" else None
    try:
        segments = post(http, eighty, response_format="verbose_json").json()["segments"]
    finally:
        generator.fault = None
    assert max(rows) == min(len(segments), 16)  # all of them, up to the server fixture's max_batch_size


def test_stream_of_pieces_arrives_in_order(client: Any, http: httpx.Client, eighty: bytes) -> None:
    expected = post(http, eighty, chunking_strategy="auto", response_format="verbose_json").json()
    events = list(
        client.audio.transcriptions.create(
            model="tiny", file=("long.wav", eighty), stream=True, chunking_strategy="auto"
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert events[-1].type == "transcript.text.done" and events[-1].text == deltas == expected["text"]
    positions = [deltas.index(s["text"]) for s in expected["segments"]]
    assert positions == sorted(positions)


def test_srt_of_long_audio(client: Any, http: httpx.Client, eighty: bytes) -> None:
    segments = post(http, eighty, response_format="verbose_json").json()["segments"]
    srt = client.audio.transcriptions.create(model="tiny", file=("long.wav", eighty), response_format="srt")
    assert srt.count(" --> ") == len(segments)
    assert srt.split("\n\n")[-1].startswith(str(len(segments)) + "\n")


def test_upload_a_bit_over_25_mb_is_413(http: httpx.Client, client: Any) -> None:
    big = b"RIFF" + bytes(25 * 1024 * 1024 + 64 * 1024)
    error = assert_openai_error(post(http, big), 413)
    assert error["code"] == "payload_too_large" and "25 MB" in error["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.transcriptions.create(model="tiny", file=("big.wav", big))
    assert info.value.status_code == 413
    with (AUDIO / "jfk.wav").open("rb") as f:
        assert client.audio.transcriptions.create(model="tiny", file=f).text


@pytest.fixture(scope="module")
def small_server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, max_transcription_audio_s=60, max_queue=1) as running:
        yield running


def test_longer_than_the_limit_is_400_stating_it(small_server: RunningServer, eighty: bytes) -> None:
    with small_server.http() as http:
        error = assert_openai_error(post(http, eighty, chunking_strategy="auto"), 400)
    assert error["code"] == "audio_too_long" and "60 s" in error["message"]


def test_queue_refusing_a_piece_withdraws_the_others(small_server: RunningServer) -> None:
    data = long_audio(50.0)  # two pieces, one queue slot
    generator, entered, release = small_server.generator, threading.Event(), threading.Event()

    def hold(stage: str, items: list[Any]) -> None:
        if stage == "prefill" and not release.is_set():
            entered.set()
            release.wait(30)

    generator.fault = hold
    with small_server.http() as http:
        blocker = threading.Thread(target=post, args=(http, (AUDIO / "jfk.wav").read_bytes()))
        blocker.start()
        try:
            assert entered.wait(30)
            assert assert_openai_error(post(http, data, chunking_strategy="auto"), 429)["code"] == "queue_full"
        finally:
            release.set()
            blocker.join(30)
            generator.fault = None
        assert small_server.engine.waiting == 0
        assert post(http, (AUDIO / "jfk.wav").read_bytes()).status_code == 200


@pytest.fixture(scope="module")
def endless_server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, transcription_tokens_per_audio_s=10_000) as running:  # runs to the context's end
        yield running


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_client_that_goes_away_stops_its_pieces(endless_server: RunningServer, stream: str) -> None:
    decoding = threading.Event()
    generator = endless_server.generator
    generator.fault = lambda stage, items: decoding.set() if stage == "step" else None
    url = httpx.URL(endless_server.base_url + "/v1/audio/transcriptions")
    request = httpx.Request(
        "POST",
        url,
        files={"file": ("jfk.wav", (AUDIO / "jfk.wav").read_bytes())},
        data={"model": "tiny", "stream": stream},
    )
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    try:
        with socket.create_connection((url.host, url.port)) as sock:
            sock.sendall(f"POST {url.path} HTTP/1.1\r\n{head}\r\n".encode() + request.read())
            assert decoding.wait(30)
        deadline = time.monotonic() + 30
        while not endless_server.engine.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        assert endless_server.engine.idle, "the rows of a request nobody waits for still decode"
    finally:
        generator.fault = None
