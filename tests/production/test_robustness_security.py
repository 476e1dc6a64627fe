"""Known attacks, reproduced through HTTP: keys leaking into logs, uploads left on disk or outside
the temp dir, file descriptors leaked by aborted uploads, and small compressed files that decode
into unbounded memory. (Forged sample rates and channel counts are in tests/production/test_robustness_inputs.py.)
"""

from __future__ import annotations

import gc
import io
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from app.logs import JsonFormatter, TextFormatter
from app.model.compute.loader import LoadedModel
from tests.support.audio_fixtures import silent_opus
from tests.support.checks import assert_openai_error, wait_until
from tests.support.server import AUDIO, RunningServer, serve

KEY = "sk-voxtral-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
OTHER_KEY = "sk-someone-elses-key-0123456789abcdef"


# --- API keys never reach the logs ------------------------------------------------------------------


def test_api_keys_never_appear_in_logs_or_responses(
    loaded: LoadedModel, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server_cm = serve(loaded, tiny_dir, api_keys=[KEY], log_level="debug", log_prompts=True)
    with server_cm as server, server.http() as http:
        good = {"authorization": f"Bearer {KEY}"}
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answers = [
            http.post("/v1/chat/completions", json=chat, headers=good),
            http.get("/v1/models", headers=good),
            http.post("/v1/chat/completions", json={"model": "nope", "messages": []}, headers=good),
            http.get(f"/v1/models?api_key={KEY}", headers=good),
            http.get("/v1/models", headers={"authorization": f"Bearer {OTHER_KEY}"}),
            http.get("/v1/models", headers={"authorization": OTHER_KEY}),  # no scheme
            http.get("/v1/models", headers={"authorization": f"Basic {OTHER_KEY}"}),
            http.get("/v1/models", headers={"x-api-key": OTHER_KEY}),
            http.get("/metrics"),
        ]
        with open(AUDIO / "jfk.wav", "rb") as f:
            answers.append(
                http.post("/v1/audio/transcriptions", files={"file": f}, data={"model": "tiny"}, headers=good)
            )
    assert [a.status_code for a in answers] == [200, 200, 400, 200, 401, 401, 401, 401, 200, 200]
    assert_openai_error(answers[4], 401)
    assert answers[4].headers["www-authenticate"] == "Bearer"
    server_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not the client's
    logged = "\n".join(f.format(r) for r in server_records for f in (JsonFormatter(), TextFormatter()))
    assert "voxtral.access" in logged and "/v1/models" in logged  # the access lines were captured
    for secret in (KEY, OTHER_KEY, KEY[3:20], OTHER_KEY[3:20]):
        assert secret not in logged
        for answer in answers:
            assert secret not in answer.text and secret not in str(answer.headers)


# --- uploads: spooled only inside the temp dir, always cleaned up -----------------------------------


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp dir of this test's own: the in-process server spools big uploads here (and nobody else does)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return spool


def regular_files(process: psutil.Process) -> set[str]:
    """Paths of the process's open files, deleted ones included (psutil's open_files() leaves those out)."""
    paths = set()
    for fd in os.listdir(f"/proc/{process.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            paths.add(target)
    return paths


def fd_count(process: psutil.Process) -> int:
    gc.collect()
    return process.num_fds()


class PausedUpload:
    """A multipart upload whose body stops after `pause_after` bytes until released, or is abandoned there."""

    def __init__(self, size: int, pause_after: int) -> None:
        boundary = "robustnessboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.body = head + np.random.default_rng(1).bytes(size) + f"\r\n--{boundary}--\r\n".encode()
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self.pause_after = pause_after
        self.paused, self.release = threading.Event(), threading.Event()

    def chunks(self) -> Iterator[bytes]:
        for start in range(0, len(self.body), 256 * 1024):
            if start >= self.pause_after and not self.paused.is_set():
                self.paused.set()
                self.release.wait(30)
            yield self.body[start : start + 256 * 1024]


def test_big_uploads_spool_inside_the_temp_dir_and_leave_nothing_behind(server: RunningServer, spool_dir: Path) -> None:
    process = psutil.Process()
    files_before, fds_before = regular_files(process), fd_count(process)
    upload = PausedUpload(size=20 * 2**20, pause_after=6 * 2**20)
    with ThreadPoolExecutor(8) as pool, server.http() as http:
        headers = {"content-type": upload.content_type}
        paused = pool.submit(http.post, "/v1/audio/transcriptions", content=upload.chunks(), headers=headers)
        assert upload.paused.wait(30)
        # Mid-upload: 6 MB are in, past Starlette's 1 MB in-memory spool, so one file is open for it ...
        wait_until(lambda: regular_files(process) - files_before, "the upload spools to a file", 20.0, 0.02)
        for path in regular_files(process) - files_before:
            assert Path(path.removesuffix(" (deleted)")).parent == spool_dir, path
        # ... while a burst of other big uploads comes and goes.
        burst = [
            pool.submit(
                http.post,
                "/v1/audio/transcriptions",
                files={"file": (f"big{i}.wav", np.random.default_rng(i).bytes(12 * 2**20))},
                data={"model": "tiny"},
            )
            for i in range(6)
        ]
        for future in burst:
            assert_openai_error(future.result(timeout=60), 400)
        upload.release.set()
        assert_openai_error(paused.result(timeout=60), 400)
    assert list(spool_dir.iterdir()) == []
    wait_until(lambda: regular_files(process) - files_before == set(), "every spooled upload is closed", 20.0, 0.02)
    wait_until(lambda: fd_count(process) <= fds_before + 2, "no file descriptor is leaked", 20.0, 0.02)


def test_an_abandoned_upload_leaves_no_file_and_no_descriptor(server: RunningServer, spool_dir: Path) -> None:
    process = psutil.Process()
    files_before, fds_before = regular_files(process), fd_count(process)
    upload = PausedUpload(size=20 * 2**20, pause_after=6 * 2**20)
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        head = (
            f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\nContent-Type: {upload.content_type}\r\n"
            f"Content-Length: {len(upload.body)}\r\n\r\n"
        )
        raw.sendall(head.encode() + upload.body[: 6 * 2**20])
        wait_until(lambda: regular_files(process) - files_before, "the upload spools to a file", 20.0, 0.02)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    wait_until(
        lambda: regular_files(process) - files_before == set(), "the abandoned upload's file is closed", 20.0, 0.02
    )
    wait_until(lambda: fd_count(process) <= fds_before + 2, "no file descriptor is leaked", 20.0, 0.02)
    assert list(spool_dir.iterdir()) == []
    with server.http() as http:
        assert http.get("/ready").status_code == 200


# --- decompression bombs ----------------------------------------------------------------------------


BOMB_LIMIT_S = 60


def webm_claiming(seconds_claimed: float, data: bytes) -> bytes:
    """Overwrite the Segment Duration (EBML id 0x4489, an 8-byte float in ms) so the header lies."""
    forged = bytearray(data)
    at = forged.find(b"\x44\x89\x88")
    assert at > 0, "no 8-byte Duration element"
    struct.pack_into(">d", forged, at + 3, seconds_claimed * 1000)
    return bytes(forged)


def flac_of_unknown_length(seconds: int, rate: int, channels: int) -> bytes:
    """Silence at a high rate and channel count, with STREAMINFO's total-sample count zeroed (unknown)."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate * 5, channels), np.int16)
        for _ in range(seconds // 5):
            f.write(block)
    forged = bytearray(buffer.getvalue())
    offset = 8 + 10
    packed = int.from_bytes(forged[offset : offset + 8], "big") & ~((1 << 36) - 1)
    forged[offset : offset + 8] = packed.to_bytes(8, "big")
    return bytes(forged)


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, int]]:
    """name -> (file, bytes of float32 its samples would take fully decoded at their own rate)."""
    return {
        "bomb.ogg": (silent_opus(600, "ogg"), 600 * 48000 * 4),
        "bomb.webm": (webm_claiming(10, silent_opus(600, "webm")), 600 * 48000 * 4),
        "bomb.flac": (flac_of_unknown_length(100, 192000, 8), 100 * 192000 * 8 * 4),
    }


@pytest.fixture(scope="module")
def bomb_server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, max_transcription_audio_s=BOMB_LIMIT_S, max_chat_audio_s=BOMB_LIMIT_S) as running:
        yield running


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def test_three_concurrent_decompression_bombs_are_refused_with_bounded_memory(
    bomb_server: RunningServer, bombs: dict[str, tuple[bytes, int]]
) -> None:
    """About 1.6 MB of files that would decode to ~800 MB: each stopped at the limit, memory stays flat."""
    assert sum(len(b) for b, _ in bombs.values()) < 3 * 2**20
    assert sum(size for _, size in bombs.values()) > 500 * 2**20
    before = rss()
    with bomb_server.http() as http, ThreadPoolExecutor(3) as pool:
        for _ in range(2):  # twice: a leak would show on the second round
            futures = [
                pool.submit(http.post, "/v1/audio/transcriptions", files={"file": (name, data)}, data={"model": "tiny"})
                for name, (data, _) in bombs.items()
            ]
            for name, future in zip(bombs, futures, strict=True):
                error = assert_openai_error(future.result(timeout=120), 400)
                assert error["code"] == "audio_too_long", (name, error)
                assert f"{BOMB_LIMIT_S} s" in error["message"], error
        grown = rss() - before
        assert grown < 300 * 2**20, f"server RSS grew {grown / 2**20:.0f} MB"
        assert http.post("/v1/audio/transcriptions", files={"file": ("jfk.wav", (AUDIO / "jfk.wav").read_bytes())},
                         data={"model": "tiny"}).status_code == 200  # fmt: skip


def test_a_bomb_as_a_chat_audio_part_is_refused_too(
    bomb_server: RunningServer, bombs: dict[str, tuple[bytes, int]]
) -> None:
    import base64

    data = base64.b64encode(bombs["bomb.webm"][0]).decode()
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "webm"}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    with bomb_server.http() as http:
        error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "audio_too_long"
