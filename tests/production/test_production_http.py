"""HTTP-layer limits against a real server built by `app.server` (the same uvicorn config as `serve`):
slow bodies and slow headers are cut off, connections are bounded, idle keep-alive is closed."""

from __future__ import annotations

import importlib.metadata
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from packaging.version import Version

from app.model.compute.loader import LoadedModel
from app.server import MAX_HEADER_BYTES
from tests.support.checks import assert_openai_error
from tests.support.production_server import production, read_response, read_until_closed
from tests.support.server import serve


def trickle_until_answered(sock: socket.socket, payload: bytes, interval_s: float) -> tuple[bytes, float]:
    """Send one byte per `interval_s` (the recv timeout paces it) until the server answers; returns
    what it sent back before closing and how long that took."""
    started = time.monotonic()
    sock.settimeout(interval_s)
    for byte in payload:
        try:
            first = sock.recv(65536)
        except TimeoutError:
            sock.sendall(bytes([byte]))
            continue
        return first + read_until_closed(sock), time.monotonic() - started
    raise AssertionError("the server waited for the whole slow payload")


CHAT_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n"
)


def test_slow_body_gets_408_and_a_closed_connection(loaded: LoadedModel, tiny_dir: Path) -> None:
    with production(loaded, tiny_dir, body_read_timeout_s=1.5) as running, running.connect() as sock:
        sock.sendall(CHAT_HEAD)
        answer, elapsed = trickle_until_answered(sock, b'{"model": "tiny", "messages": []}' * 20, interval_s=1.0)
        with running.http() as http:
            assert http.get("/health").status_code == 200  # the server itself was never held up
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower()
    response = httpx.Response(408, content=body, headers={"content-type": "application/json"})
    assert assert_openai_error(response, 408)["code"] == "request_timeout"
    assert 1.4 < elapsed < 5


def test_body_within_the_deadline_is_fine(loaded: LoadedModel, tiny_dir: Path) -> None:
    with production(loaded, tiny_dir, body_read_timeout_s=5) as running, running.http() as http:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_slow_headers_get_408_and_a_closed_connection(loaded: LoadedModel, tiny_dir: Path) -> None:
    with production(loaded, tiny_dir, header_read_timeout_s=1) as running, running.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        answer, elapsed = trickle_until_answered(sock, b"X-Slow: " + b"a" * 100, interval_s=0.25)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 < elapsed < 5


def test_a_silent_connection_is_closed(loaded: LoadedModel, tiny_dir: Path) -> None:
    with production(loaded, tiny_dir, header_read_timeout_s=0.5) as running, running.connect() as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""
    assert time.monotonic() - started < 5


def test_idle_keep_alive_is_not_cut_by_the_header_timeout(loaded: LoadedModel, tiny_dir: Path) -> None:
    settings = {"header_read_timeout_s": 0.3, "keep_alive_timeout_s": 2}
    with production(loaded, tiny_dir, **settings) as running, running.connect() as sock:
        request = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
        sock.sendall(request)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.settimeout(1.0)  # idle for longer than the header timeout...
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(10)
        sock.sendall(request)  # ...and the connection still serves
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # then keep-alive closes it
    assert time.monotonic() - started < 3


def test_max_connections_answers_503(loaded: LoadedModel, tiny_dir: Path) -> None:
    with production(loaded, tiny_dir, max_connections=2) as running, running.connect() as held:
        held.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(held).startswith(b"HTTP/1.1 200 ")  # open, idle, counted
        with running.http() as http:
            refused = http.get("/health")
            error = assert_openai_error(refused, 503)
            assert error["code"] == "too_many_connections" and error["type"] == "server_error"
            assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        held.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(held).startswith(b"HTTP/1.1 200 ")  # the connections within the limit still serve


def test_unfinished_oversized_head_gets_400(loaded: LoadedModel, tiny_dir: Path) -> None:
    """A head still incomplete past MAX_HEADER_BYTES is refused at once, not buffered on."""
    with production(loaded, tiny_dir) as running, running.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1024))
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")


def test_chunked_body_over_the_limit_is_413_not_400(loaded: LoadedModel, tiny_dir: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}]}'

    with serve(loaded, tiny_dir, max_upload_mb=0.01) as running, running.http() as http:
        response = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        declared = http.post("/v1/chat/completions", content=b"x" * (2 << 20))
    assert assert_openai_error(response, 413)["code"] == "payload_too_large"
    assert assert_openai_error(declared, 413)["code"] == "payload_too_large"


@pytest.mark.parametrize(("package", "minimum"), [("python-multipart", "0.0.31"), ("starlette", "0.49.1")])
def test_upload_stack_is_patched(package: str, minimum: str) -> None:
    """Versions with fixes for multipart parsing DoS / upload handling advisories."""
    assert Version(importlib.metadata.version(package)) >= Version(minimum)
