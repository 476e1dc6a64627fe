"""A dead device is a dead server (issue 33): an injected CUDA error the process cannot recover from, of each
kind, in a decode step or a prefill, answers the request in flight 503 `device_failed`, turns /health and
/ready 503 `failed`, refuses what comes next, and the server run by `build_server` (what `voxtral-server
serve` runs) stops on its own, so the process exits non-zero. An out-of-memory error still only preempts.

Faults are injected by wrapping the model's generator (tests/support/faults.py), each test on a server of its
own: a failed server serves nothing more."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from app.model.compute.loader import LoadedModel
from app.model.compute.row import Row
from app.server import build_server
from app.wiring import Wiring
from tests.support.checks import assert_openai_error, wait_until
from tests.support.faults import FaultyGenerator
from tests.support.server import free_port, make_settings, serve, wait_ready

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12}

Raise = Callable[[], BaseException]
KINDS: list[tuple[str, Raise]] = [
    ("step", lambda: RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`")),
    ("prefill", lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered")),
    ("step", lambda: torch.AcceleratorError("CUDA error: uncorrectable ECC error encountered")),
    ("prefill", lambda: RuntimeError("CUDA error: no CUDA-capable device is detected")),
]


class FailAt:
    """Raises a fresh `error()` at every call of `stage` (a dead device fails every call), from the first."""

    def __init__(self, stage: str, error: Raise) -> None:
        self.stage, self.error = stage, error
        self.fired = threading.Event()

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == self.stage:
            self.fired.set()
            raise self.error()


def assert_device_failed(response: httpx.Response) -> None:
    assert assert_openai_error(response, 503)["code"] == "device_failed"


@pytest.mark.parametrize(("stage", "error"), KINDS, ids=["assert-step", "illegal-prefill", "ecc-step", "lost-prefill"])
def test_a_dead_device_answers_503_and_turns_the_probes_unhealthy(
    stage: str, error: Raise, loaded: LoadedModel, tiny_dir: Path
) -> None:
    with serve(loaded, tiny_dir) as server, server.http() as http:
        wait_until(lambda: server.engine.idle, "the warm-up is over")
        server.generator.fault = FailAt(stage, error)
        with ThreadPoolExecutor(2) as pool:  # one in flight, one queued behind it: both answered
            answers = list(pool.map(lambda _: http.post("/v1/chat/completions", json=CHAT), range(2)))
        for answer in answers:
            assert_device_failed(answer)
        wiring = server.wiring
        assert wiring is not None
        wait_until(wiring.failed, "the lifecycle turns failed (on the event loop)")
        assert server.engine.dead is not None and "CUDA" in server.engine.dead
        health, ready = http.get("/health"), http.get("/ready")
        assert (health.status_code, health.json()) == (503, {"status": "failed"})
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert ready.json()["reason"].startswith("the device failed: CUDA error")
        assert_device_failed(http.post("/v1/chat/completions", json=CHAT))  # nothing more is taken
        assert server.engine.idle


@contextmanager
def production(loaded: LoadedModel, tiny_dir: Path) -> Iterator[tuple[Wiring, FaultyGenerator, threading.Thread, str]]:
    """The server `voxtral-server serve` runs: `build_server`, which exits once `wiring.failed()`."""
    generator = FaultyGenerator()
    settings = make_settings(tiny_dir, port=free_port())
    wiring = Wiring(settings, loaded, wrap_generator=generator.wrap)
    server = build_server(wiring.app, settings, wiring.drain, wiring.failed)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_ready(base + "/ready", thread, lambda: server.started)
        yield wiring, generator, thread, base
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_server_exits_once_its_device_is_dead(loaded: LoadedModel, tiny_dir: Path) -> None:
    with production(loaded, tiny_dir) as (wiring, generator, thread, base), httpx.Client(base_url=base) as http:
        generator.fault = FailAt("step", KINDS[0][1])
        assert_device_failed(http.post("/v1/chat/completions", json=CHAT, timeout=60))
        thread.join(15)
        assert not thread.is_alive(), "the server kept running on a dead device"
        assert wiring.failed()  # app/main.py then exits 1: the orchestrator restarts the process


class OomOnce:
    """Holds the first prefill until both requests are queued, then runs out of memory once in a decode step
    of two rows."""

    def __init__(self, server_engine_waiting: Callable[[], int]) -> None:
        self.waiting, self.fired, self.held = server_engine_waiting, False, False

    def __call__(self, stage: str, rows: list[Row]) -> None:
        if stage == "prefill" and not self.held:
            self.held = True
            wait_until(lambda: len(rows) + self.waiting() >= 2, "both requests are queued")
        if stage == "step" and len(rows) >= 2 and not self.fired:
            self.fired = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_still_only_preempts(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir) as server, server.http() as http:
        wait_until(lambda: server.engine.idle, "the warm-up is over")
        hook = OomOnce(lambda: server.engine.waiting)
        server.generator.fault = hook
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: http.post("/v1/chat/completions", json=CHAT), range(2)))
        assert hook.fired and [a.status_code for a in answers] == [200, 200]
        assert server.wiring is not None and not server.wiring.failed() and server.engine.dead is None
        assert http.get("/health").json() == {"status": "ready"} and http.get("/ready").status_code == 200
