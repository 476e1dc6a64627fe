"""Shared fixtures: one tiny model built and loaded per session, real servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import settings as hypothesis_settings

from app.api.context import AppContext
from app.config import Settings
from app.model.compute.loader import LoadedModel, load_model
from app.wiring import Wiring
from tests.audio_fixtures import DATA
from tests.faults import FaultyGenerator
from tests.speech_layout import Layout, make_layout

# Property tests explore a fixed set of examples: CI must not turn red on a new random draw.
hypothesis_settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis_settings.load_profile("deterministic")

AUDIO = DATA  # the committed clips; tests never read outside the repository


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come only from what a test passes, never from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("VOXTRAL_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("voxtral-cache")


def make_settings(cache_dir: Path, **overrides: Any) -> Settings:
    return Settings(model="tiny", cache_dir=cache_dir, **overrides)


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path) -> LoadedModel:
    return load_model(make_settings(tiny_dir))


@pytest.fixture(scope="module")
def layout() -> Layout:
    """The 23 s file of speech, silences and a tail (tests/speech_layout.py), for chunking tests."""
    return make_layout()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningServer:
    def __init__(
        self, app: Any, port: int, generator: FaultyGenerator | None = None, wiring: Wiring | None = None
    ) -> None:
        self.app = app
        self.wiring = wiring
        """What built the app (servers made by `serve`): its `context` once the server has started."""
        self.generator = generator
        """What its engine calls for the model (servers made by `serve`): set `generator.fault` to inject
        faults (tests/faults.py)."""
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def context(self) -> AppContext:
        assert self.wiring is not None and self.wiring.context is not None, "a server made by `serve`, started"
        return self.wiring.context

    @property
    def engine(self) -> Any:
        return self.context.serving.engine

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="test", max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)


@contextmanager
def serve(loaded: LoadedModel, cache_dir: Path, **overrides: Any) -> Iterator[RunningServer]:
    generator = FaultyGenerator()
    wiring = Wiring(make_settings(cache_dir, **overrides), loaded, wrap_generator=generator.wrap)
    with RunningServer(wiring.app, free_port(), generator, wiring) as server:
        yield server


@pytest.fixture(scope="session")
def server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, max_batch_size=16) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Any:
    return server.client()


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    return dict(error)


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 15.0, poll_s: float = 0.01) -> None:
    """Poll a condition that no event announces (the worker's row count, the server closing a file)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(poll_s)


@pytest.fixture(scope="session")
def full_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the real checkpoints' 131,072-token vocabulary, built once (about 8 s, 75 MB)."""
    from app.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("voxtral-full-vocab"), full_vocab=True)


@pytest.fixture(scope="session")
def full_vocab(full_vocab_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(full_vocab_dir)))
