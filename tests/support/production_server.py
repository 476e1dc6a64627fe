"""A real uvicorn server on a free port (as `python -m app` runs it), and raw-socket reads from it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from app.api.context import AppContext
from app.engine.engine import Engine
from app.model.compute.loader import LoadedModel
from app.server import DrainingServer, build_server
from app.wiring import Wiring
from tests.support.server import free_port, make_settings, wait_ready


class Production:
    """The app under `app.server.build_server`, run in a thread (signals are sent with `handle_exit`)."""

    def __init__(self, server: DrainingServer, wiring: Wiring) -> None:
        self.server, self.wiring, self.app = server, wiring, wiring.app
        self.port = server.config.port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=server.run, daemon=True)

    @property
    def context(self) -> AppContext:
        assert self.wiring.context is not None, "the server has started"
        return self.wiring.context

    @property
    def engine(self) -> Engine:
        assert self.wiring.engine is not None, "the server has started"
        return self.wiring.engine

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)

    def connect(self, timeout: float = 10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


@contextmanager
def production(loaded: LoadedModel, tiny_dir: Path, **overrides: Any) -> Iterator[Production]:
    settings = make_settings(tiny_dir, port=free_port(), **overrides)
    wiring = Wiring(settings, loaded)
    running = Production(build_server(wiring.app, settings, wiring.drain, wiring.failed), wiring)
    running.thread.start()
    wait_ready(running.base_url + "/ready", running.thread, lambda: running.server.started)
    try:
        yield running
    finally:
        running.server.should_exit = True
        running.thread.join(30)


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a content-length body, on a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(v for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n")) if k.lower() == b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body
