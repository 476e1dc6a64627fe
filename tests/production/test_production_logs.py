"""One structured line per request; JSON or text from one formatter; no user content unless asked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.logs import FIELDS, JsonFormatter, TextFormatter, configure_logging
from app.model.compute.loader import LoadedModel
from tests.support.access_log import AccessLog
from tests.support.checks import wait_until
from tests.support.server import AUDIO, make_settings, serve

MARKER = "PURPLE-GIRAFFE-4417"
ACCESS_KEYS = {
    "request_id",
    "method",
    "path",
    "endpoint",
    "status",
    "duration_s",
    "queue_s",
    "run_s",
    "audio_s",
    "prompt_tokens",
    "completion_tokens",
}


@pytest.fixture(scope="module")
def running(loaded: LoadedModel, tiny_dir: Path) -> Any:
    with serve(loaded, tiny_dir) as server:
        yield server


@pytest.fixture
def access() -> Iterator[AccessLog]:
    logger = logging.getLogger("voxtral.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def ask(http: Any, text: str, **headers: str) -> Any:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 5, "temperature": 0}
    response = http.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def test_one_json_line_per_request_with_request_id(running: Any, access: AccessLog) -> None:
    with running.http() as http:
        response = ask(http, "Hello", **{"X-Request-ID": "req-from-client-1"})
        made = http.get("/v1/models")
    assert response.headers["x-request-id"] == "req-from-client-1"
    assert len(made.headers["x-request-id"]) == 32
    first, second = access.lines(2)
    assert set(first) >= ACCESS_KEYS and {"time", "level", "logger", "message"} <= set(first)
    assert first["request_id"] == "req-from-client-1" and second["request_id"] == made.headers["x-request-id"]
    assert (first["endpoint"], first["status"], first["level"]) == ("/v1/chat/completions", 200, "info")
    assert first["completion_tokens"] == 5 and first["prompt_tokens"] > 0
    assert first["queue_s"] >= 0 and first["run_s"] > 0 and first["audio_s"] == 0
    assert (second["endpoint"], second["prompt_tokens"]) == ("/v1/models", 0)


def test_transcription_line_has_audio_seconds(running: Any, access: AccessLog) -> None:
    with running.http() as http, open(AUDIO / "jfk.wav", "rb") as f:
        files = {"file": ("jfk.wav", f)}
        assert http.post("/v1/audio/transcriptions", files=files, data={"model": "tiny"}).status_code == 200
    [line] = access.lines(1)
    assert line["audio_s"] == pytest.approx(11.0, abs=0.01) and line["prompt_tokens"] > 375


def test_no_prompt_text_in_any_log_by_default(
    running: Any, access: AccessLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with running.http() as http:
        ask(http, f"Please repeat {MARKER}")
    access.lines(1)
    formatter = JsonFormatter()
    assert any(r.name == "voxtral.access" for r in caplog.records)
    assert all(MARKER not in formatter.format(r) for r in caplog.records)


def test_log_prompts_adds_prompt_and_output(loaded: LoadedModel, tiny_dir: Path, access: AccessLog) -> None:
    with serve(loaded, tiny_dir, log_prompts=True) as server, server.http() as http:
        answer = ask(http, f"Please repeat {MARKER}").json()["choices"][0]["message"]["content"]
    [line] = access.lines(1)
    assert MARKER in line["prompt"] and line["output"] == answer


def test_errors_are_logged_with_their_status(running: Any, access: AccessLog) -> None:
    with running.http() as http:
        assert http.post("/v1/chat/completions", json={"model": "tiny"}).status_code == 400
    [line] = access.lines(1)
    assert line["status"] == 400 and line["completion_tokens"] == 0


def test_probes_scrapes_and_refused_scrapes_are_debug_lines_only(
    loaded: LoadedModel, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/production.md: `info` writes one line per /v1 request; probes and scrapes (a scraper without the
    key included) are logged at debug, so a probe every few seconds never drowns the request lines."""
    caplog.set_level(logging.DEBUG, logger="voxtral.access")
    with serve(loaded, tiny_dir, api_keys=["k"], metrics_require_key=True) as server, server.http() as http:
        caplog.clear()  # what `serve` polled while the model loaded is not this test's
        assert [http.get(p).status_code for p in ("/health", "/ready", "/metrics")] == [200, 200, 401]
        assert http.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        wait_until(lambda: len([r for r in caplog.records if r.name == "voxtral.access"]) >= 4, "4 access lines")
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "voxtral.access"}
    assert levels == {
        "GET /health 200": logging.DEBUG,
        "GET /ready 200": logging.DEBUG,
        "GET /metrics 401": logging.DEBUG,
        "GET /v1/models 200": logging.INFO,
    }


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logging")
def test_configure_logging_json(tiny_dir: Path) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(tiny_dir, log_level="warning"), stream)
    logging.getLogger("voxtral.access").info("dropped: below the level")
    logging.getLogger("voxtral.access").warning("kept", extra={FIELDS: {"status": 503, "path": "/v1/x"}})
    logging.getLogger("uvicorn.error").error("from uvicorn")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["kept", "from uvicorn"]
    assert lines[0]["status"] == 503 and lines[0]["level"] == "warning" and lines[1]["logger"] == "uvicorn.error"


@pytest.mark.usefixtures("restore_root_logging")
def test_configure_logging_text(tiny_dir: Path) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(tiny_dir, log_format="text", log_level="INFO"), stream)
    logging.getLogger("voxtral.access").info("GET /v1/models 200", extra={FIELDS: {"status": 200, "audio_s": 1.5}})
    [line] = stream.getvalue().splitlines()
    assert line.endswith("INFO voxtral.access: GET /v1/models 200 status=200 audio_s=1.5")


def test_formatters_keep_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", None, exc_info=__import__("sys").exc_info()
        )
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]
    assert "ValueError: boom" in TextFormatter().format(record)
