"""Faults inside the server, through HTTP: a model that raises, a model that hangs, a client that leaves
mid-stream, a client that reads slowly. Each time every request still gets exactly one answer, the
queue drains, the batch empties and /ready stays 200.

Faults are injected by wrapping the model's generator (`server.generator.fault(stage, rows)`, called
before each prefill, merge and decode step: tests/support/faults.py), on a server of this module's own, so a
hung or failing worker never touches the session's shared server.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from app.engine.ticket import Ticket
from app.model.compute.loader import LoadedModel
from app.model.compute.row import Row
from app.types import SamplingParams
from tests.support.checks import assert_openai_error, wait_until
from tests.support.server import AUDIO, RunningServer, serve

TIMEOUT_S = 2.0
"""--request-timeout-s of this module's server: a hung model is answered 504 after this."""
MARK = 7
"""max_tokens that marks the request a fault targets (no other request here asks for 7)."""
JFK = (AUDIO / "jfk.wav").read_bytes()


@pytest.fixture(scope="module")
def faulty(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, request_timeout_s=TIMEOUT_S, max_batch_size=8) as running:
        yield running


@pytest.fixture
def fhttp(faulty: RunningServer) -> Iterator[httpx.Client]:
    """A client of the faulty server; after the test the fault is gone and the engine has drained."""
    with faulty.http() as client:
        yield client
    faulty.generator.fault = None
    wait_until(lambda: engine_idle(faulty), "the engine drains after the test")


# --- helpers ----------------------------------------------------------------------------------------


def engine_idle(server: RunningServer) -> bool:
    return server.engine.waiting == 0 and server.engine.running == 0


def marked(rows: list[Row]) -> bool:
    return any(row.sampling.max_new_tokens == MARK for row in rows)


class HoldMarked:
    """A fault that holds the worker inside the marked request's prefill until released."""

    def __init__(self, wait_s: float = 30) -> None:
        self.entered, self.release, self.wait_s = threading.Event(), threading.Event(), wait_s

    def __call__(self, at: str, rows: list[Row]) -> None:
        if at == "prefill" and marked(rows):
            self.entered.set()
            self.release.wait(self.wait_s)


def chat_body(max_tokens: int = 4, stream: bool = False, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Tell me a long story."}]
    return {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "stream": stream, **extra}


def normal_chat(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/chat/completions", json=chat_body())


def transcribe(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/audio/transcriptions", files={"file": ("jfk.wav", JFK)}, data={"model": "tiny"})


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def assert_recovered(server: RunningServer, http: httpx.Client) -> None:
    """The queue drained, no row is left running, /ready is 200 and normal requests succeed."""
    wait_until(lambda: engine_idle(server), "the queue drains and the batch empties")
    assert http.get("/ready").status_code == 200
    assert normal_chat(http).status_code == 200
    assert transcribe(http).status_code == 200
    wait_until(lambda: engine_idle(server), "the engine is idle again")


def answer_all(sends: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Send all at once from threads; every one must come back with a response (no exception, no hang)."""
    with ThreadPoolExecutor(len(sends)) as pool:
        return [future.result(timeout=60) for future in [pool.submit(send) for send in sends]]


# --- a model that raises ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["prefill", "step"])
def test_model_exception_fails_its_batch_with_a_500_and_the_server_recovers(
    stage: str, faulty: RunningServer, fhttp: httpx.Client
) -> None:
    calls = 0

    def hook(at: str, rows: list[Row]) -> None:
        nonlocal calls
        if at == stage and marked(rows):
            calls += 1
            # a CUDA error the device survives (a sticky one fails the server: tests/production/test_device_failure.py)
            raise RuntimeError("injected model failure: CUDA error: invalid configuration argument")

    faulty.generator.fault = hook
    bad = lambda: fhttp.post("/v1/chat/completions", json=chat_body(MARK))  # noqa: E731
    others = [lambda: normal_chat(fhttp), lambda: transcribe(fhttp)] * 4
    responses = answer_all([bad, *others])
    error = assert_openai_error(responses[0], 500)
    assert error == {
        "message": "The model failed while running this request.",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "CUDA" not in responses[0].text  # the cause is logged, never sent
    for response in responses[1:]:  # those in the failing batch get the same 500, the others their answer
        if response.status_code != 200:
            assert_openai_error(response, 500)
    assert calls >= 1
    assert_recovered(faulty, fhttp)


def test_model_exception_mid_stream_ends_the_stream_with_an_error_event(
    faulty: RunningServer, fhttp: httpx.Client
) -> None:
    steps = 0

    def hook(at: str, rows: list[Row]) -> None:
        nonlocal steps
        if at == "step" and marked(rows):
            steps += 1
            if steps == 3:
                raise RuntimeError("injected failure on the third decode step")

    faulty.generator.fault = hook
    # Greedy: the tiny model's first tokens are then fixed, and they decode to text.
    body = chat_body(MARK, stream=True, temperature=0)
    with fhttp.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = list(sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "internal_error", events
    assert any(e["choices"][0]["delta"].get("content") for e in events[:-2] if "choices" in e)
    assert_recovered(faulty, fhttp)


# --- a model that hangs -----------------------------------------------------------------------------


def test_hung_model_is_answered_504_and_the_server_recovers_when_it_returns(
    faulty: RunningServer, fhttp: httpx.Client
) -> None:
    hook = HoldMarked()
    entered, release = hook.entered, hook.release

    faulty.generator.fault = hook
    with ThreadPoolExecutor(4) as pool:
        try:
            hung = pool.submit(fhttp.post, "/v1/chat/completions", json=chat_body(MARK))
            assert entered.wait(10), "the marked request never reached the model"
            # The event loop is free while the model thread is stuck: probes and cheap routes answer.
            assert fhttp.get("/health").status_code == 200
            assert fhttp.get("/v1/models").status_code == 200
            queued = [pool.submit(normal_chat, fhttp), pool.submit(transcribe, fhttp)]
            stream = pool.submit(read_stream, fhttp, chat_body(4, stream=True))
            started = time.monotonic()
            error = assert_openai_error(hung.result(timeout=30), 504)
            assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
            assert str(int(TIMEOUT_S)) in error["message"]
            for future in queued:  # waited behind the hung model: answered 504 too, never left hanging
                assert_openai_error(future.result(timeout=30), 504)
            events = stream.result(timeout=30)
            assert events[-2]["error"]["code"] == "request_timeout" and events[-1] == "[DONE]", events
            assert time.monotonic() - started < TIMEOUT_S + 5
        finally:
            release.set()
    assert_recovered(faulty, fhttp)


def read_stream(http: httpx.Client, body: dict[str, Any]) -> list[Any]:
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        return list(sse_events(response.iter_lines()))


# --- clients that leave or dawdle -------------------------------------------------------------------


def test_client_leaving_mid_stream_takes_its_row_out_of_the_batch(server: RunningServer) -> None:
    """On the shared server (10-minute request timeout): only noticing the disconnect can free the row."""
    engine = server.engine
    for _ in range(3):  # a new connection closed each time; the server must notice every one
        body = chat_body(20_000, stream=True)
        with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            first = list(itertools.islice(sse_events(response.iter_lines()), 4))
            assert any(e["choices"][0]["delta"].get("content") for e in first), first
            assert engine.running == 1
        wait_until(lambda: engine.running == 0, "the abandoned row leaves the batch", timeout_s=10)
        assert server.engine.waiting == 0
    with server.http() as http:
        assert_recovered(server, http)


def test_client_leaving_a_transcription_stream_takes_its_rows_out(server: RunningServer) -> None:
    """Pieces decoded as rows of one batch; each stops long before its token budget once the client is gone."""
    steps: dict[int, int] = {}
    tickets: dict[int, tuple[Ticket | None, SamplingParams]] = {}

    def count_steps(at: str, rows: list[Row]) -> None:
        for row in rows:
            steps[row.key] = steps.get(row.key, 0) + 1
            tickets.setdefault(row.key, (server.engine.ticket(row.key), row.sampling))

    speech = sf.read(io.BytesIO(JFK), dtype="float32")[0]  # the speech detector cuts speech, not tones
    many_pieces = np.tile(np.concatenate([speech, np.zeros(32000, np.float32)]), 6)  # 78 s: 6 pieces
    data = {"model": "tiny", "stream": "true", "chunking_strategy": "auto"}
    server.generator.fault = count_steps
    try:
        with server.http() as http:
            files = {"file": ("a.wav", wav(many_pieces))}
            with http.stream("POST", "/v1/audio/transcriptions", files=files, data=data) as response:
                assert response.status_code == 200
                assert next(sse_events(response.iter_lines()))["type"] == "transcript.text.delta"
        wait_until(lambda: engine_idle(server), "the transcription's rows leave the batch", timeout_s=10)
    finally:
        server.generator.fault = None
    assert steps  # pieces still queued when the client left were dropped before they reached the model
    for key, count in steps.items():
        ticket, sampling = tickets[key]
        assert ticket is not None and ticket.cancelled and count < sampling.max_new_tokens // 2, (count, sampling)
    with server.http() as http:
        assert_recovered(server, http)


def wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV")
    return buffer.getvalue()


def test_slow_stream_reader_does_not_hold_up_other_requests(faulty: RunningServer, fhttp: httpx.Client) -> None:
    """One SSE line per 0.2 s; with the stream open and half read, other requests are answered as usual."""
    half_read, others_done = threading.Event(), threading.Event()
    events: list[Any] = []

    def slow_reader() -> None:
        body = chat_body(12, stream=True)
        with faulty.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            for event in sse_events(response.iter_lines()):
                events.append(event)
                if len(events) == 3:
                    half_read.set()
                    others_done.wait(60)
                time.sleep(0.2)  # the slow client itself, not a wait for the server

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    try:
        assert half_read.wait(30)
        responses = answer_all([lambda: normal_chat(fhttp), lambda: transcribe(fhttp)] * 3)
        assert [r.status_code for r in responses] == [200] * 6
        assert len(events) == 3 and reader.is_alive()  # all answered while the slow stream was open
    finally:
        others_done.set()
    reader.join(30)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert_recovered(faulty, fhttp)


# --- one request's bad parameter never fails another's ----------------------------------------------


def test_a_bad_seed_is_refused_before_it_can_fail_a_batch(faulty: RunningServer, fhttp: httpx.Client) -> None:
    """A seed outside int64 once reached torch.Generator.manual_seed inside the worker's batched prefill and
    failed every request prefilled with it: it must be refused (400) before it is queued."""
    hook = HoldMarked(10)
    entered, release = hook.entered, hook.release

    faulty.generator.fault = hook
    with ThreadPoolExecutor(3) as pool:
        try:
            blocker = pool.submit(fhttp.post, "/v1/chat/completions", json=chat_body(MARK, temperature=0))
            assert entered.wait(10)
            good = pool.submit(fhttp.post, "/v1/chat/completions", json=chat_body(4, temperature=0.5, seed=1))
            for seed in (2**63, -(2**63) - 1, 2**80):
                bad = fhttp.post("/v1/chat/completions", json=chat_body(4, temperature=0.5, seed=seed))
                assert assert_openai_error(bad, 400)["param"] == "seed"
            wait_until(lambda: faulty.engine.waiting == 1, "the good request is queued")
            release.set()
            assert blocker.result(timeout=30).status_code == 200
            assert good.result(timeout=30).status_code == 200
        finally:
            release.set()
    extremes = [chat_body(2, temperature=0.5, seed=seed) for seed in (2**63 - 1, -(2**63), 0)]
    assert [fhttp.post("/v1/chat/completions", json=body).status_code for body in extremes] == [200] * 3
    assert_recovered(faulty, fhttp)


# --- admission: a request the queue will refuse costs nothing first --------------------------------


def test_a_full_queue_refuses_before_decoding_audio(
    loaded: LoadedModel, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.serving.prep as service_module

    decoded: list[int] = []
    real_decode = service_module.decode_audio

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(service_module, "decode_audio", counting_decode)
    hook = HoldMarked()
    entered, release = hook.entered, hook.release

    with serve(loaded, tiny_dir, max_queue=1, max_batch_size=1) as small, small.http() as http:
        small.generator.fault = hook
        with ThreadPoolExecutor(2) as pool:
            try:
                running = pool.submit(http.post, "/v1/chat/completions", json=chat_body(MARK))
                assert entered.wait(10)
                queued = pool.submit(normal_chat, http)
                wait_until(lambda: small.engine.waiting == 1, "the queue is full")
                refused = transcribe(http)
                assert_openai_error(refused, 429)
                assert decoded == [], "the refused upload was decoded first"
            finally:
                release.set()
        assert running.result(timeout=30).status_code == 200
        assert queued.result(timeout=30).status_code == 200
