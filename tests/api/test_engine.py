"""Queue, batcher and worker behaviour: 429 when full, 504 on timeout, isolation of failures,
cancelled rows stop, and the event loop never waits on torch."""

from __future__ import annotations

import statistics
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.model.compute.loader import LoadedModel
from app.model.compute.row import Row
from tests.support.checks import assert_openai_error, wait_until
from tests.support.server import AUDIO, serve

CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 4,
    "temperature": 0,
}


class Gate:
    """A fault (tests/support/faults.py) that holds the worker in a prefill until released (no sleeps: events)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == "prefill":
            self.entered.set()
            self.release.wait(30)


def _give_up(base_url: str, after_s: float) -> None:
    """A client that stops waiting for its answer and closes the connection."""
    impatient = httpx.Client(base_url=base_url, timeout=httpx.Timeout(30, read=after_s))
    with impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/chat/completions", json=CHAT)


def test_full_queue_is_429_and_abandoned_requests_give_their_places_back(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, max_queue=2, max_batch_size=1) as server, ThreadPoolExecutor(8) as pool:
        gate = Gate()
        server.generator.fault = gate
        with server.http() as http:
            held = pool.submit(http.post, "/v1/chat/completions", json=CHAT)
            assert gate.entered.wait(10)
            impatient = [pool.submit(_give_up, server.base_url, 2.0) for _ in range(2)]
            wait_until(lambda: server.engine.waiting == 2, "the queue is full")
            refused = http.post("/v1/chat/completions", json=CHAT)
            error = assert_openai_error(refused, 429)
            assert error["type"] == "rate_limit_error" and refused.headers["retry-after"].isdigit()
            for gone in impatient:
                gone.result()
            # Both clients left while queued and the worker is still held, yet their places are free.
            wait_until(lambda: server.engine.waiting == 0, "abandoned requests leave the queue")
            queued = [pool.submit(http.post, "/v1/chat/completions", json=CHAT) for _ in range(2)]
            wait_until(lambda: server.engine.waiting == 2, "the new requests are queued")
            gate.release.set()
            server.generator.fault = None
            assert [f.result().status_code for f in [held, *queued]] == [200, 200, 200]


def test_timeout_is_504_and_the_server_recovers(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, request_timeout_s=2.0) as server:  # recovery must fit it on a busy CI
        gate = Gate()
        server.generator.fault = gate
        with server.http() as http:
            error = assert_openai_error(http.post("/v1/chat/completions", json=CHAT), 504)
            assert error["code"] == "request_timeout"
            server.generator.fault = None
            gate.release.set()
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


class FailOnce:
    def __init__(self, stage: str) -> None:
        self.stage, self.fired = stage, False

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == self.stage and not self.fired:
            self.fired = True
            raise RuntimeError("injected fault")


@pytest.mark.parametrize("stage", ["prefill", "step"])
def test_a_failing_batch_is_500_and_the_worker_goes_on(server: Any, stage: str) -> None:
    server.generator.fault = FailOnce(stage)
    try:
        with server.http() as http:
            error = assert_openai_error(http.post("/v1/chat/completions", json=CHAT), 500)
            assert "injected" not in error["message"] and error["type"] == "server_error"
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda _: http.post("/v1/chat/completions", json=CHAT).status_code, range(8)))
            assert codes == [200] * 8
    finally:
        server.generator.fault = None


def test_health_answers_fast_while_a_long_batch_runs(server: Any) -> None:
    long = {**CHAT, "max_tokens": 400}
    with server.http() as http, ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(http.post, "/v1/chat/completions", json=long) for _ in range(16)]
        while server.engine.running == 0:
            time.sleep(0.005)
        latencies = []
        while server.engine.running and len(latencies) < 20:
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
        assert all(f.result().status_code == 200 for f in futures)
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.05, latencies


def test_base64_audio_is_unpacked_off_the_event_loop(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding the base64 of a 25 MB upload takes ~100 ms: on the event loop it would stall every
    connection (the /health test above covers the model; this covers request preparation)."""
    from app.serving import chat_request
    from tests.support.audio_fixtures import JFK, wav_b64

    threads: list[str] = []
    original = chat_request.b64_audio

    def observed(raw: str) -> bytes:
        threads.append(threading.current_thread().name)
        return original(raw)

    monkeypatch.setattr(chat_request, "b64_audio", observed)
    audio = {"type": "input_audio", "input_audio": {"data": wav_b64(JFK[:16000]), "format": "wav"}}
    data_url = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + wav_b64(JFK[:8000])}}
    body = {**CHAT, "messages": [{"role": "user", "content": [audio, data_url, {"type": "text", "text": "?"}]}]}
    with server.http() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert len(threads) == 2 and all(name.startswith("voxtral-prep") for name in threads), threads


def test_a_client_that_disconnects_mid_stream_stops_its_row(server: Any) -> None:
    body = {**CHAT, "max_tokens": 3000, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for _ in response.iter_lines():
                if server.engine.running:
                    break
        # The connection is closed here: the row must leave the batch long before 3000 tokens.
        deadline = time.monotonic() + 10
        while server.engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.running == 0
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
        wait_until(lambda: server.engine.running == 0, "the abandoned row leaves the batch", timeout_s=10)
        with server.http() as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


class OomOnce:
    """Raise CUDA's out-of-memory error once, in a decode step with several rows. The first prefill
    waits until all the requests are in, so that they do decode together however fast the first
    ones would otherwise finish alone."""

    def __init__(self, engine: Any, requests: int) -> None:
        self.engine, self.requests = engine, requests
        self.held = self.fired = False

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == "prefill" and not self.held:
            self.held = True
            wait_until(lambda: len(rows) + self.engine.waiting >= self.requests, "the other requests are queued")
        if stage == "step" and len(rows) >= 4 and not self.fired:
            self.fired = True
            raise torch.OutOfMemoryError("injected CUDA out of memory")


def test_out_of_memory_mid_decode_recomputes_rows_and_changes_no_output(loaded: LoadedModel, tiny_dir: Path) -> None:
    bodies = [
        {**CHAT, "max_tokens": 24, "messages": [{"role": "user", "content": "hello " * (i + 1)}]} for i in range(6)
    ]
    clean, responses, hook = _clean_then_faulty(loaded, tiny_dir, bodies, lambda engine: OomOnce(engine, 6))
    assert hook.fired
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == clean


def _clean_then_faulty(
    loaded: LoadedModel, tiny_dir: Path, bodies: list[dict[str, Any]], fault: Callable[[Any], Any]
) -> tuple[list[str], list[httpx.Response], Any]:
    """The chat answers of `bodies` sent together on a clean server, then the responses of the same sent again
    with `fault(engine)` set on its generator (returned, to read what it saw)."""

    def send_all(http: httpx.Client) -> list[httpx.Response]:
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies))

    with serve(loaded, tiny_dir, max_batch_size=8) as server, server.http() as http:
        clean = [r.json()["choices"][0]["message"]["content"] for r in send_all(http)]
        hook = fault(server.engine)
        server.generator.fault = hook
        return clean, send_all(http), hook


class OomPartWay:
    """Holds the first prefill until the other requests are queued (so they prefill together next); the first
    prefill of several rows (that one, when requests came together before the worker took any, else the next)
    allocates a tensor and runs out of memory, as a pass that got part way does. Each later prefill records
    whether the tensor still lives: the failed pass's frames, held by its traceback."""

    def __init__(self, engine: Any, requests: int) -> None:
        self.engine, self.requests = engine, requests
        self.waited = False
        self.partial: weakref.ref[torch.Tensor] | None = None
        self.alive: list[bool] = []

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage != "prefill":
            return
        if not self.waited:
            self.waited = True
            wait_until(lambda: len(rows) + self.engine.waiting >= self.requests, "the other requests are queued")
        if self.partial is None and len(rows) >= 2:
            keys_so_far = torch.empty(1 << 20)
            self.partial = weakref.ref(keys_so_far)
            raise torch.OutOfMemoryError("injected CUDA out of memory")
        if self.partial is not None:
            self.alive.append(self.partial() is not None)


def test_a_prefill_out_of_memory_retries_in_halves_after_freeing_the_failed_pass(
    loaded: LoadedModel, tiny_dir: Path
) -> None:
    """The split retry runs once the failed pass's tensors are gone (on a GPU, empty_cache gives them back to
    the halves), and every request is answered as it is without the fault."""
    bodies = [{**CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "hi " * (i + 1)}]} for i in range(5)]
    clean, responses, hook = _clean_then_faulty(loaded, tiny_dir, bodies, lambda engine: OomPartWay(engine, 5))
    assert hook.partial is not None, "no prefill of several rows ran out of memory"
    assert [r.status_code for r in responses] == [200] * 5
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == clean
    assert hook.alive and not any(hook.alive), hook.alive


class StepRecorder:
    """Holds the first decode step until a second request is queued; records each step's rows."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.steps: list[int] = []

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == "step":
            if not self.steps:
                wait_until(lambda: self.engine.waiting >= 1, "the second request is queued")
            self.steps.append(len(rows))


def _steps_of_two_overlapping_requests(loaded: LoadedModel, tiny_dir: Path, **settings: Any) -> list[int]:
    """Rows in each decode step, when a second request arrives while the first one decodes."""
    long = {**CHAT, "max_tokens": 40}
    with serve(loaded, tiny_dir, **settings) as server, server.http() as http:
        wait_until(lambda: server.engine.idle, "the warm-up is over")  # so `running` below is the first
        recorder = StepRecorder(server.engine)
        server.generator.fault = recorder
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(http.post, "/v1/chat/completions", json=long)
            wait_until(lambda: recorder.steps or server.engine.running, "the first request runs")
            second = pool.submit(http.post, "/v1/chat/completions", json=long)
            assert [first.result().status_code, second.result().status_code] == [200, 200]
        server.generator.fault = None
    return recorder.steps


@pytest.mark.parametrize("continuous", [True, False])
def test_continuous_batching_admits_between_steps_and_static_batching_does_not(
    loaded: LoadedModel, tiny_dir: Path, continuous: bool
) -> None:
    steps = _steps_of_two_overlapping_requests(loaded, tiny_dir, continuous_batching=continuous)
    # Continuous: the second request joins the first one's batch mid-flight. Static: it waits for the
    # batch to finish, so no step ever runs both, and the first row's 39 steps run alone.
    assert max(steps) == (2 if continuous else 1)
    assert steps[:39] == ([1] + [2] * 38 if continuous else [1] * 39)


class OomWhileWide:
    """CUDA's out-of-memory error on every decode step of 4 rows or more: only a batch that stays
    smaller after the first one gets through."""

    def __init__(self, engine: Any, requests: int) -> None:
        self.engine, self.requests = engine, requests
        self.held, self.fired = False, 0

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == "prefill" and not self.held:
            self.held = True
            wait_until(lambda: len(rows) + self.engine.waiting >= self.requests, "the other requests are queued")
        if stage == "step" and len(rows) >= 4:
            self.fired += 1
            raise torch.OutOfMemoryError("injected CUDA out of memory")


def test_after_out_of_memory_the_batch_stays_small_and_outputs_do_not_change(
    loaded: LoadedModel, tiny_dir: Path
) -> None:
    bodies = [{**CHAT, "max_tokens": 24, "messages": [{"role": "user", "content": "hi " * (i + 1)}]} for i in range(6)]
    with serve(loaded, tiny_dir, max_batch_size=8) as server, server.http() as http:
        with ThreadPoolExecutor(6) as pool:
            clean = [r.json() for r in pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies)]
        hook = OomWhileWide(server.engine, len(bodies))
        server.generator.fault = hook
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies))
        server.generator.fault = None
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json()["choices"][0]["message"] for r in responses] == [c["choices"][0]["message"] for c in clean]
    # 6 rows fail once; halves of 3 then run under the cap. Without it the parked half rejoins at
    # once and every step fails again.
    assert hook.fired == 1


class FailJoin:
    """Holds the first decode step until the second request is queued, then fails (or runs out of
    memory) merging that request's prefilled row into the running batch, once."""

    def __init__(self, engine: Any, error: BaseException) -> None:
        self.engine, self.error = engine, error
        self.steps = 0
        self.fired = False

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == "step":
            self.steps += 1
            if self.steps == 1:
                wait_until(lambda: self.engine.waiting >= 1, "the second request is queued")
        if stage == "merge" and not self.fired:
            self.fired = True
            raise self.error


@pytest.mark.parametrize("oom", [False, True], ids=["error", "out_of_memory"])
def test_a_failing_merge_answers_the_new_rows_and_spares_the_running_ones(
    loaded: LoadedModel, tiny_dir: Path, oom: bool
) -> None:
    first = {**CHAT, "max_tokens": 40}
    second = {**CHAT, "max_tokens": 12, "messages": [{"role": "user", "content": "bonjour"}]}
    with serve(loaded, tiny_dir) as server, server.http() as http:
        clean = [http.post("/v1/chat/completions", json=b).json()["choices"][0]["message"] for b in (first, second)]
        wait_until(lambda: server.engine.idle, "the clean runs are over")  # so `running` below is the first
        error = torch.OutOfMemoryError("injected") if oom else RuntimeError("injected")
        hook = FailJoin(server.engine, error)
        server.generator.fault = hook
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(http.post, "/v1/chat/completions", json=first)
            wait_until(lambda: server.engine.running, "the first request runs")
            joining = pool.submit(http.post, "/v1/chat/completions", json=second)
            answers = [running.result(timeout=60), joining.result(timeout=60)]
        server.generator.fault = None
        assert hook.fired
        assert answers[0].status_code == 200
        assert answers[0].json()["choices"][0]["message"] == clean[0]
        if oom:  # the new row waited for room, was prefilled again and finished unchanged
            assert answers[1].status_code == 200
            assert answers[1].json()["choices"][0]["message"] == clean[1]
        else:
            assert assert_openai_error(answers[1], 500)["type"] == "server_error"
        wait_until(lambda: server.engine.idle, "nothing is left running or parked")


def test_a_request_over_the_running_token_budget_waits_for_the_batch(loaded: LoadedModel, tiny_dir: Path) -> None:
    """With room for one row's KV cache only, the second request cannot join: it runs after the first."""
    assert max(_steps_of_two_overlapping_requests(loaded, tiny_dir, max_running_tokens=1)) == 1


class CancelThenOom:
    """Both requests prefill together; in their first decode step one is abandoned and the step runs out
    of memory. The other must be recomputed, not failed for being alone now."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.held = self.fired = False

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == "prefill" and not self.held:
            self.held = True
            wait_until(lambda: len(rows) + self.engine.waiting >= 2, "both requests are queued")
        if stage == "step" and len(rows) == 2 and not self.fired:
            self.fired = True
            self.engine.ticket(rows[1].key).cancel()
            raise torch.OutOfMemoryError("injected CUDA out of memory")


def test_out_of_memory_with_one_row_abandoned_recomputes_the_other(loaded: LoadedModel, tiny_dir: Path) -> None:
    bodies = [{**CHAT, "max_tokens": 16, "messages": [{"role": "user", "content": w}]} for w in ("one", "two")]
    with serve(loaded, tiny_dir) as server, server.http() as http:
        clean = http.post("/v1/chat/completions", json=bodies[0]).json()["choices"][0]["message"]
        wait_until(lambda: server.engine.idle, "the clean run is over")
        hook = CancelThenOom(server.engine)
        server.generator.fault = hook
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(http.post, "/v1/chat/completions", json=bodies[0])
            wait_until(lambda: hook.held, "the first request is prefilling")
            second = pool.submit(http.post, "/v1/chat/completions", json=bodies[1])
            answers = [first.result(timeout=60), second.result(timeout=60)]
        server.generator.fault = None
    assert hook.fired
    assert answers[0].status_code == 200 and answers[0].json()["choices"][0]["message"] == clean
    assert answers[1].status_code == 504  # abandoned: answered, nobody reads it
