"""Real servers on 127.0.0.1 for tests: the app built by `Wiring` with the tiny model, run by uvicorn in a
thread, with a fault-injecting generator (`tests/support/faults.py`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

from app.api.context import AppContext
from app.config import Settings
from app.engine.engine import Engine
from app.model.compute.loader import LoadedModel
from app.wiring import Wiring
from tests.support.audio_fixtures import DATA
from tests.support.faults import FaultyGenerator

AUDIO = DATA  # the committed clips; tests never read outside the repository


def make_settings(cache_dir: Path, **overrides: Any) -> Settings:
    return Settings(**({"model": "tiny", "cache_dir": cache_dir} | overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, thread: threading.Thread, listening: Callable[[], bool], timeout_s: float = 60) -> None:
    """Until the server in `thread` listens and `url` (its /ready) answers 200."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as http:
        while not (listening() and http.get(url).status_code == 200):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"server did not start or never got ready ({url})")
            time.sleep(0.02)


class RunningServer:
    """Started: listening and ready (the app loads its model in the background: /ready turns 200 once warm)."""

    def __init__(
        self,
        app: ASGIApp,
        port: int,
        generator: FaultyGenerator | None = None,
        wiring: Wiring | None = None,
        ready_path: str = "/ready",
    ) -> None:
        self.app, self.ready_path = app, ready_path
        self.wiring = wiring
        """What built the app (servers made by `serve`): its `context` once the server has started."""
        self.generator = generator
        """What its engine calls for the model (servers made by `serve`): set `generator.fault` to inject
        faults (tests/support/faults.py)."""
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        wait_ready(self.base_url + self.ready_path, self.thread, lambda: self.server.started)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def context(self) -> AppContext:
        assert self.wiring is not None and self.wiring.context is not None, "a server made by `serve`, started"
        return self.wiring.context

    @property
    def engine(self) -> Engine:
        assert self.wiring is not None and self.wiring.engine is not None, "a server made by `serve`, started"
        return self.wiring.engine

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
