"""The realtime ticking loop's failure and shutdown paths through the real server (`build_server`, as
`voxtral-server serve` runs it), with faults injected into the loop's engine as tests/support/faults.py does
for the engine's generator: a device failure fails the server like the engine's `on_fatal`; a tick that raises
anything else fails only its streams; a loop that breaks outside a tick fails the server instead of dying
silently; a drain that times out answers open HTTP transcriptions 503 `shutting_down`; an HTTP transcription
waits at most --request-timeout-s (issue 28's review, items 6-8)."""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import soundfile as sf

from app.model.compute.loader import LoadedModel
from app.serving.realtime.streams import StreamLoop
from tests.support.production_server import Production, production
from tests.support.realtime_client import sentence

MODEL = "tiny-realtime"
ILLEGAL = "CUDA error: an illegal memory access was encountered"


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Released at the end of the test, so a tick held on it lets the loop's thread go."""
    event = threading.Event()
    yield event
    event.set()


def loop_of(running: Production) -> StreamLoop:
    assert running.wiring.streams is not None, "a realtime model's server"
    return running.wiring.streams


def before_each(running: Production, name: str, fault: Callable[[], object]) -> None:
    """Run `fault` in the loop's thread before each call of its engine's `name` (tick, ready)."""
    engine = loop_of(running).engine
    real = getattr(engine, name)

    def wrapped() -> Any:
        fault()
        return real()

    setattr(engine, name, wrapped)


def transcribe(running: Production, timeout: float = 60) -> httpx.Response:
    wav = io.BytesIO()
    sf.write(wav, sentence(), 16000, format="WAV")
    files = {"file": ("a.wav", wav.getvalue(), "audio/wav")}
    with running.http() as http:
        return http.post("/v1/audio/transcriptions", files=files, data={"model": MODEL}, timeout=timeout)


def raise_(exc: BaseException) -> Callable[[], None]:
    def fault() -> None:
        raise exc

    return fault


def test_a_device_failure_in_a_tick_fails_the_server(realtime_model: LoadedModel, tmp_path: Path) -> None:
    with production(realtime_model, tmp_path, model=MODEL) as running:
        before_each(running, "tick", raise_(RuntimeError(ILLEGAL)))
        response = transcribe(running)
        assert response.status_code == 503 and response.json()["error"]["code"] == "device_failed"
        running.thread.join(15)
        assert not running.thread.is_alive(), "the server kept running on a dead device"
        assert running.wiring.failed()


def test_a_tick_that_raises_fails_its_streams_and_the_server_goes_on(
    realtime_model: LoadedModel, tmp_path: Path
) -> None:
    failures: list[int] = []

    def once() -> None:
        if not failures:
            failures.append(1)
            raise ValueError("injected")

    with production(realtime_model, tmp_path, model=MODEL) as running:
        before_each(running, "tick", once)
        failed = transcribe(running)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert transcribe(running).status_code == 200
        with running.http() as http:
            assert http.get("/ready").status_code == 200
        assert not running.wiring.failed()


def test_a_loop_that_breaks_outside_a_tick_fails_the_server(realtime_model: LoadedModel, tmp_path: Path) -> None:
    with production(realtime_model, tmp_path, model=MODEL) as running:
        before_each(running, "ready", raise_(ValueError("injected")))
        response = transcribe(running)
        assert response.status_code == 500
        running.thread.join(15)
        assert not running.thread.is_alive() and running.wiring.failed()


def test_a_drain_timeout_answers_an_open_transcription_503(
    realtime_model: LoadedModel, tmp_path: Path, gate: threading.Event
) -> None:
    with production(realtime_model, tmp_path, model=MODEL, drain_timeout_s=1) as running:
        before_each(running, "tick", lambda: gate.wait(30))  # no tick ends until the test does
        outcome: list[httpx.Response] = []
        client = threading.Thread(target=lambda: outcome.append(transcribe(running)), daemon=True)
        client.start()
        deadline = time.monotonic() + 30
        while loop_of(running).live == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        running.server.handle_exit(signal.SIGTERM, None)
        client.join(20)
        running.thread.join(20)
        assert not running.thread.is_alive()
    assert outcome and outcome[0].status_code == 503, outcome
    assert outcome[0].json()["error"]["code"] == "shutting_down"


def test_a_transcription_waits_at_most_the_request_timeout(
    realtime_model: LoadedModel, tmp_path: Path, gate: threading.Event
) -> None:
    with production(realtime_model, tmp_path, model=MODEL, request_timeout_s=0.5) as running:
        before_each(running, "tick", lambda: gate.wait(30))
        response = transcribe(running, timeout=20)
        assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
        gate.set()
        assert loop_of(running).live == 0
