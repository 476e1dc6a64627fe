"""Queue, batcher and worker behaviour: 429 when full, 504 on timeout, isolation of failures,
cancelled rows stop, and the event loop never waits on torch."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.engine.batcher import select_batch
from app.model.loader import LoadedModel
from tests.conftest import AUDIO, assert_openai_error, serve, wait_until

CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 4,
    "temperature": 0,
}


def test_batcher_takes_oldest_then_similar_lengths() -> None:
    assert select_batch([100, 900, 110, 95, 2000], max_rows=3, max_tokens=10_000) == [0, 2, 3]
    assert select_batch([], 4, 100) == []


def test_batcher_respects_the_token_budget_but_never_starves_the_oldest() -> None:
    assert select_batch([5000, 100, 100], max_rows=8, max_tokens=1000) == [0]
    assert select_batch([400, 400, 400, 400], max_rows=8, max_tokens=1000) == [0, 1]


class Gate:
    """A fault hook that holds the worker until released (no sleeps: events)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, stage: str, items: list[Any]) -> None:
        if stage == "prefill":
            self.entered.set()
            self.release.wait(30)


def test_full_queue_is_429_with_retry_after(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, max_queue=2, max_batch_size=1) as server, ThreadPoolExecutor(8) as pool:
        gate = Gate()
        server.engine.worker.fault_hook = gate
        with server.http() as http:
            held = pool.submit(http.post, "/v1/chat/completions", json=CHAT)
            assert gate.entered.wait(10)
            queued = [pool.submit(http.post, "/v1/chat/completions", json=CHAT) for _ in range(2)]
            while len(server.engine.queue) < 2:
                time.sleep(0.01)
            refused = http.post("/v1/chat/completions", json=CHAT)
            error = assert_openai_error(refused, 429)
            assert error["type"] == "rate_limit_error" and refused.headers["retry-after"].isdigit()
            gate.release.set()
            server.engine.worker.fault_hook = None
            assert [f.result().status_code for f in [held, *queued]] == [200, 200, 200]


def test_timeout_is_504_and_the_server_recovers(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, request_timeout_s=0.5) as server:
        gate = Gate()
        server.engine.worker.fault_hook = gate
        with server.http() as http:
            error = assert_openai_error(http.post("/v1/chat/completions", json=CHAT), 504)
            assert error["code"] == "request_timeout"
            server.engine.worker.fault_hook = None
            gate.release.set()
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


class FailOnce:
    def __init__(self, stage: str) -> None:
        self.stage, self.fired = stage, False

    def __call__(self, stage: str, items: list[Any]) -> None:
        if stage == self.stage and not self.fired:
            self.fired = True
            raise RuntimeError("injected fault")


@pytest.mark.parametrize("stage", ["prefill", "step"])
def test_a_failing_batch_is_500_and_the_worker_goes_on(server: Any, stage: str) -> None:
    server.engine.worker.fault_hook = FailOnce(stage)
    try:
        with server.http() as http:
            error = assert_openai_error(http.post("/v1/chat/completions", json=CHAT), 500)
            assert "injected" not in error["message"] and error["type"] == "server_error"
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda _: http.post("/v1/chat/completions", json=CHAT).status_code, range(8)))
            assert codes == [200] * 8
    finally:
        server.engine.worker.fault_hook = None


def test_health_answers_fast_while_a_long_batch_runs(server: Any) -> None:
    long = {**CHAT, "max_tokens": 400}
    with server.http() as http, ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(http.post, "/v1/chat/completions", json=long) for _ in range(16)]
        while server.engine.worker.running == 0:
            time.sleep(0.005)
        latencies = []
        while server.engine.worker.running and len(latencies) < 20:
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
        assert all(f.result().status_code == 200 for f in futures)
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.05, latencies


def test_base64_audio_is_unpacked_off_the_event_loop(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding the base64 of a 25 MB upload takes ~100 ms: on the event loop it would stall every
    connection (the /health test above covers the model; this covers request preparation)."""
    from app.api import chat_request
    from tests.test_parity import JFK, _wav_b64

    threads: list[str] = []
    original = chat_request.b64_audio

    def observed(raw: str) -> bytes:
        threads.append(threading.current_thread().name)
        return original(raw)

    monkeypatch.setattr(chat_request, "b64_audio", observed)
    audio = {"type": "input_audio", "input_audio": {"data": _wav_b64(JFK[:16000]), "format": "wav"}}
    data_url = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + _wav_b64(JFK[:8000])}}
    body = {**CHAT, "messages": [{"role": "user", "content": [audio, data_url, {"type": "text", "text": "?"}]}]}
    with server.http() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert len(threads) == 2 and all(name.startswith("voxtral-prep") for name in threads), threads


def test_a_client_that_disconnects_mid_stream_stops_its_row(server: Any) -> None:
    body = {**CHAT, "max_tokens": 3000, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for _ in response.iter_lines():
                if server.engine.worker.running:
                    break
        # The connection is closed here: the row must leave the batch long before 3000 tokens.
        deadline = time.monotonic() + 10
        while server.engine.worker.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.worker.running == 0
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def _chat_call(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30000})


def _transcription_call(http: httpx.Client) -> httpx.Response:
    files = {"file": ("jfk.wav", (AUDIO / "jfk.wav").read_bytes())}
    return http.post("/v1/audio/transcriptions", files=files, data={"model": "tiny"})


@pytest.mark.parametrize("call", [_chat_call, _transcription_call], ids=["chat", "transcription"])
def test_a_client_that_disconnects_before_a_plain_answer_stops_its_row(
    loaded: LoadedModel, tiny_dir: Path, call: Callable[[httpx.Client], httpx.Response]
) -> None:
    """Not streamed: nothing is sent until the end, so the server must notice the closed connection itself.
    30000 tokens would take the tiny model half a minute or more; the row must go within seconds."""
    with serve(loaded, tiny_dir, transcription_min_tokens=30000) as server:
        timeout = httpx.Timeout(30, read=1.0)
        with httpx.Client(base_url=server.base_url, timeout=timeout) as http, pytest.raises(httpx.ReadTimeout):
            call(http)
        # The client closed its connection on the read timeout, after the row had run for a second.
        wait_until(lambda: server.engine.worker.running == 0, "the abandoned row leaves the batch", timeout_s=10)
        with server.http() as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


class OomOnce:
    """Raise CUDA's out-of-memory error once, in a decode step with several rows. The first prefill
    waits until all the requests are in, so that they do decode together however fast the first
    ones would otherwise finish alone."""

    def __init__(self, queue: Any, requests: int) -> None:
        self.queue, self.requests = queue, requests
        self.held = self.fired = False

    def __call__(self, stage: str, items: list[Any]) -> None:
        if stage == "prefill" and not self.held:
            self.held = True
            wait_until(lambda: len(items) + len(self.queue) >= self.requests, "the other requests are queued")
        if stage == "step" and len(items) >= 4 and not self.fired:
            self.fired = True
            raise torch.OutOfMemoryError("injected CUDA out of memory")


def test_out_of_memory_mid_decode_recomputes_rows_and_changes_no_output(loaded: LoadedModel, tiny_dir: Path) -> None:
    bodies = [
        {**CHAT, "max_tokens": 24, "messages": [{"role": "user", "content": "hello " * (i + 1)}]} for i in range(6)
    ]
    with serve(loaded, tiny_dir, max_batch_size=8) as server, server.http() as http:
        with ThreadPoolExecutor(6) as pool:
            clean = [
                r.json()["choices"][0]["message"]["content"]
                for r in pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies)
            ]
        hook = OomOnce(server.engine.queue, len(bodies))
        server.engine.worker.fault_hook = hook
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies))
        assert hook.fired
        assert [r.status_code for r in responses] == [200] * 6
        assert [r.json()["choices"][0]["message"]["content"] for r in responses] == clean
