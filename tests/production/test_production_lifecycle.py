"""Readiness and graceful shutdown: a real `voxtral-server serve` process and a real SIGTERM.

What a client sees during the drain: the socket stays open, so a new /v1 request gets a 503
`shutting_down` (not "connection refused"); connection refused comes only once the drain is
over and the process is exiting.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.model.compute.loader import LoadedModel, ModelLoadError
from app.server import build_server
from app.wiring import Wiring
from tests.support.checks import assert_openai_error, wait_until
from tests.support.faults import FaultyGenerator
from tests.support.production_server import production, read_response
from tests.support.server import AUDIO, free_port, make_settings

ROOT = Path(__file__).resolve().parents[2]
BOUNDARY = "voxtral-test-boundary"


def chat_body(max_tokens: int, stream: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Tell me a long story."}]
    return {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def upload_body() -> bytes:
    form = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n--{BOUNDARY}\r\n'
    form += 'Content-Disposition: form-data; name="file"; filename="jfk.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    return form.encode() + (AUDIO / "jfk.wav").read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def start_held_upload(port: int) -> tuple[socket.socket, bytes]:
    """A transcription whose headers are in and whose body the test sends when it chooses: an accepted
    request that stays in flight exactly as long as the test needs, however fast the machine is.
    `Expect: 100-continue` makes the server say when the app has started reading it."""
    body = upload_body()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
        + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
    return sock, body


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base_url = f"http://127.0.0.1:{port}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        with self.http() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    if http.get("/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise AssertionError("never ready:\n" + self.log.read_text())

    def metric(self, name: str) -> float:
        with self.http() as http:
            for line in http.get("/metrics").text.splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0


@pytest.fixture
def process(loaded: LoadedModel, tiny_dir: Path, tmp_path: Path) -> Iterator[Server]:
    port, log = free_port(), tmp_path / "server.log"
    args = ["--model", "tiny", "--port", str(port), "--cache-dir", str(tiny_dir), "--drain-timeout-s", "30"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.main", "serve", *args], cwd=ROOT, stdout=out, stderr=out)
    server = Server(proc, port, log)
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class Stream(threading.Thread):
    """A streaming chat read in the background; `first` is set once the server has started answering."""

    def __init__(self, server: Server, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, chat_body(max_tokens, True)
        self.first = threading.Event()
        self.outcome: dict[str, Any] = {}

    def run(self) -> None:
        with self.server.http() as http, http.stream("POST", "/v1/chat/completions", json=self.body) as response:
            chunks = []
            for chunk in response.iter_text():
                chunks.append(chunk)
                self.first.set()
            self.outcome = {"status": response.status_code, "text": "".join(chunks)}


def test_sigterm_drains_accepted_requests_and_refuses_new_ones(process: Server) -> None:
    upload, body = start_held_upload(process.port)
    stream = Stream(process, 200)
    stream.start()
    assert stream.first.wait(60), "the stream never started"

    process.proc.send_signal(signal.SIGTERM)
    with process.http() as http:
        while (ready := http.get("/ready")).status_code == 200:
            time.sleep(0.02)
        assert (ready.status_code, ready.json()["status"]) == (503, "draining")
        refused = http.post("/v1/chat/completions", json=chat_body(2, False))
        assert assert_openai_error(refused, 503)["code"] == "shutting_down"
        assert refused.headers["connection"] == "close"
        health = http.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "draining"})

    upload.sendall(body)  # the accepted upload finishes during the drain
    answer = read_response(upload)
    upload.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert isinstance(json.loads(answer.partition(b"\r\n\r\n")[2])["text"], str)
    stream.join(60)
    assert stream.outcome["status"] == 200
    assert stream.outcome["text"].rstrip().endswith("data: [DONE]")
    assert '"finish_reason":"length"' in stream.outcome["text"].replace(" ", "")

    assert process.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError), process.http() as http:
        http.get("/health")  # only now: connection refused
    lines = [json.loads(line) for line in process.log.read_text().splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("received SIGTERM: draining") for line in lines)
    refused_line = next(line for line in lines if line.get("status") == 503 and line.get("endpoint"))
    assert refused_line["endpoint"] == "/v1/chat/completions"


def test_drain_timeout_answers_what_is_left_with_503(loaded: LoadedModel, tiny_dir: Path) -> None:
    """A request that cannot finish within --drain-timeout-s gets a `shutting_down` error, not a cut
    connection, and the server still exits promptly."""
    with production(loaded, tiny_dir, drain_timeout_s=1) as running:
        outcome: dict[str, Any] = {}

        def long_stream() -> None:
            with running.http() as http, http.stream("POST", "/v1/chat/completions", json=chat_body(30000, True)) as r:
                outcome["text"] = "".join(r.iter_text())

        client = threading.Thread(target=long_stream, daemon=True)
        client.start()
        while running.engine.running == 0:
            time.sleep(0.02)
        started = time.monotonic()
        running.server.handle_exit(signal.SIGTERM, None)
        running.thread.join(20)
        client.join(20)
        assert not running.thread.is_alive() and time.monotonic() - started < 10
    assert '"code": "shutting_down"' in outcome["text"].replace('":"', '": "')
    assert outcome["text"].rstrip().endswith("data: [DONE]")


class SlowStart:
    """A server whose model load and warm-up each wait for the test's go, so each start-up state can be
    seen for as long as the test needs, however fast the machine is."""

    def __init__(self, loaded: LoadedModel, tiny_dir: Path, load: Any = None) -> None:
        self.load_go, self.warm_go = threading.Event(), threading.Event()
        self.generator = FaultyGenerator()
        self.generator.fault = self._hold_warm_up
        settings = make_settings(tiny_dir, port=free_port())
        self.wiring = Wiring(settings, wrap_generator=self.generator.wrap, load=load or self._slow(loaded))
        self.server = build_server(self.wiring.app, settings, self.wiring.drain, self.wiring.failed)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{settings.port}"

    def _slow(self, loaded: LoadedModel) -> Any:
        def load(settings: Any) -> LoadedModel:
            assert self.load_go.wait(60), "the test never let the load finish"
            return loaded

        return load

    def _hold_warm_up(self, stage: str, rows: Any) -> None:
        assert self.warm_go.wait(60), "the test never let the warm-up finish"

    def __enter__(self) -> SlowStart:
        self.thread.start()
        wait_until(lambda: self.server.started, "the server listens")
        return self

    def __exit__(self, *exc: object) -> None:
        self.load_go.set()
        self.warm_go.set()
        self.server.should_exit = True
        self.thread.join(30)


def refused_while_starting(response: httpx.Response) -> None:
    assert assert_openai_error(response, 503)["code"] == "model_not_ready"
    assert response.headers["retry-after"] == "5"


def test_the_server_answers_while_the_model_loads_and_warms_up_then_serves(loaded: LoadedModel, tiny_dir: Path) -> None:
    """Each start-up state in order, over real HTTP and a real socket: the process is alive (/health 200)
    from its first second, not ready (/ready 503 with the reason), and /v1 refuses with Retry-After; then ready."""
    with SlowStart(loaded, tiny_dir) as starting, httpx.Client(base_url=starting.base_url, timeout=30) as http:
        ws_url = starting.base_url.replace("http", "ws")
        for stage in ("loading the model", "warming up"):
            health, ready = http.get("/health"), http.get("/ready")
            assert (health.status_code, health.json()) == (200, {"status": "loading"})
            assert ready.status_code == 503
            assert ready.json() == {"status": "loading", "model": "tiny", "reason": stage}
            refused_while_starting(http.get("/v1/models"))
            refused_while_starting(http.post("/v1/chat/completions", json=chat_body(2, False)))
            with pytest.raises(InvalidStatus) as upgrade, connect(ws_url + "/v1/realtime?intent=transcription"):
                pass
            assert upgrade.value.response.status_code == 503
            assert http.get("/metrics").status_code == 200
            assert http.get("/").status_code == 200  # the playground page loads
            if stage == "loading the model":
                starting.load_go.set()
                wait_until(lambda: http.get("/ready").json()["reason"] == "warming up", "the warm-up starts")
        starting.warm_go.set()
        wait_until(lambda: http.get("/ready").status_code == 200, "ready")
        assert http.get("/ready").json() == {"status": "ready", "model": "tiny"}
        assert http.get("/health").json() == {"status": "ready"}
        answer = http.post("/v1/chat/completions", json=chat_body(2, False))
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


def test_a_failed_start_up_says_why_and_the_server_exits(
    loaded: LoadedModel, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(settings: Any) -> LoadedModel:
        raise ModelLoadError("Could not load model '/models/x': no weights")

    with SlowStart(loaded, tiny_dir, load=broken) as starting:
        starting.thread.join(15)
        assert not starting.thread.is_alive(), "the server kept running after its start-up failed"
    assert starting.wiring.failed()
    failures = [r for r in caplog.records if r.getMessage().startswith("start-up failed")]
    assert [r.getMessage() for r in failures] == ["start-up failed: Could not load model '/models/x': no weights"]
    assert not failures[0].exc_info  # one line, no traceback: the message says what to do


def test_sigterm_while_the_model_loads_exits_at_once(loaded: LoadedModel, tiny_dir: Path) -> None:
    """Nothing is accepted while loading, so a SIGTERM ends the server without waiting for the load (which
    runs in a thread that does not hold the process)."""
    with SlowStart(loaded, tiny_dir) as starting, httpx.Client(base_url=starting.base_url, timeout=30) as http:
        assert http.get("/ready").json()["reason"] == "loading the model"
        started = time.monotonic()
        starting.server.handle_exit(signal.SIGTERM, None)
        starting.thread.join(15)
        assert not starting.thread.is_alive() and time.monotonic() - started < 10
        assert not starting.wiring.failed() and starting.wiring.context is None


def test_an_app_whose_lifespan_never_ran_is_not_ready(loaded: LoadedModel, tiny_dir: Path) -> None:
    async def check() -> None:
        bare = httpx.ASGITransport(app=Wiring(make_settings(tiny_dir), loaded).app)  # no lifespan: no state
        async with httpx.AsyncClient(transport=bare, base_url="http://test") as client:
            assert (await client.get("/ready")).status_code == 503
            assert assert_openai_error(await client.get("/v1/models"), 503)["code"] == "model_not_ready"

    asyncio.run(check())


def test_ctrl_c_drains_and_exits_0_too(process: Server) -> None:
    process.proc.send_signal(signal.SIGINT)
    assert process.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError), process.http() as http:
        http.get("/health")
