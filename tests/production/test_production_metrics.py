"""/metrics after real requests, read back with prometheus_client's own text parser."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics
from app.model.compute.generate import BatchGenerator
from app.model.compute.loader import LoadedModel
from tests.support.metric_names import COUNTERS, METRICS, VLLM_COUNTERS, VLLM_GAUGES
from tests.support.server import AUDIO, serve

JFK_SECONDS = 11.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: Any) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(http: Any, stream: bool = False, audio: bool = False) -> Any:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Say something."}]
    if audio:
        data = base64.b64encode((AUDIO / "jfk.wav").read_bytes()).decode()
        content.insert(0, {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6, "stream": stream}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def transcribe(http: Any) -> Any:
    with open(AUDIO / "jfk.wav", "rb") as f:
        response = http.post("/v1/audio/transcriptions", files={"file": ("jfk.wav", f)}, data={"model": "tiny"})
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def running(loaded: LoadedModel, tiny_dir: Path) -> Any:
    with serve(loaded, tiny_dir) as server:
        yield server


def test_exported_names_are_exactly_what_the_dashboards_use(running: Any) -> None:
    with running.http() as http:
        text = http.get("/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    assert names == METRICS
    assert {n for n in names if n.endswith("_total")} == COUNTERS | VLLM_COUNTERS
    assert all(n.startswith("voxtral_") for n in names - VLLM_GAUGES - VLLM_COUNTERS)


def test_requests_move_every_counter(running: Any) -> None:
    with running.http() as http:
        before = scrape(http)
        chat(http)
        chat(http, stream=True)
        transcribe(http)
        assert http.get("/v1/no-such-route").status_code == 404
        after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat_ok = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert delta("voxtral_requests_total", **chat_ok) == 2
    assert delta("voxtral_requests_total", endpoint="/v1/audio/transcriptions", status="200") == 1
    assert delta("voxtral_requests_total", endpoint="unmatched", status="404") == 1
    assert delta("voxtral_e2e_request_latency_seconds_count", endpoint="/v1/chat/completions") == 2
    for histogram in ("time_to_first_token_seconds", "request_queue_time_seconds"):
        assert delta(f"voxtral_{histogram}_count") == 3, histogram
    assert delta("voxtral_batch_size_count") >= 6 + 6  # one observation per decode step
    assert delta("voxtral_batch_fill_ratio_count") >= 1
    assert delta("voxtral_prompt_tokens_total") > 375  # the transcription's audio window alone
    assert delta("voxtral_generation_tokens_total") >= 12
    assert delta("voxtral_audio_seconds_total") == pytest.approx(JFK_SECONDS, abs=0.01)
    assert delta("voxtral_real_time_factor_count") == 1
    assert value(after, "voxtral_num_requests_waiting") == 0
    assert value(after, "voxtral_num_requests_running") == 0
    assert value(after, "voxtral_model_load_seconds") > 0


def test_chat_audio_counts_decoded_seconds_not_padded_windows(running: Any) -> None:
    with running.http() as http:
        before = scrape(http)
        chat(http, audio=True)
        after = scrape(http)
    seconds = value(after, "voxtral_audio_seconds_total") - value(before, "voxtral_audio_seconds_total")
    assert seconds == pytest.approx(JFK_SECONDS, abs=0.01)  # not the 30 s window the model pads it to
    rtf_sum = value(after, "voxtral_real_time_factor_sum") - value(before, "voxtral_real_time_factor_sum")
    assert 0 < rtf_sum < 10


def test_refused_requests_count_no_audio(running: Any) -> None:
    with running.http() as http:
        before = scrape(http)
        with open(AUDIO / "jfk.wav", "rb") as f:
            files = {"file": ("jfk.wav", f)}
            bad = http.post("/v1/audio/transcriptions", files=files, data={"model": "nope"})
        assert bad.status_code == 404
        after = scrape(http)
    assert value(after, "voxtral_audio_seconds_total") == value(before, "voxtral_audio_seconds_total")
    labels = {"endpoint": "/v1/audio/transcriptions", "status": "404"}
    assert value(after, "voxtral_requests_total", **labels) - value(before, "voxtral_requests_total", **labels) == 1


def test_probes_are_not_counted_as_requests(running: Any) -> None:
    with running.http() as http:
        http.get("/health")
        http.get("/ready")
        samples = scrape(http)
    endpoints = {dict(labels).get("endpoint") for (name, labels) in samples if name == "voxtral_requests_total"}
    assert not endpoints & {"/health", "/ready", "/metrics", "other"}


def test_gpu_memory_is_sampled_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    metrics = Metrics()
    metrics.sample_gpu_memory()
    if not torch.cuda.is_available():  # no GPU: no series at all, rather than a misleading 0
        assert "voxtral_gpu_memory_bytes{" not in _text(metrics)
        assert "voxtral_gpu_memory_peak_bytes{" not in _text(metrics)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 1000 * (index + 1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 5000 * (index + 1))
    metrics.sample_gpu_memory()
    text = _text(metrics)
    assert 'voxtral_gpu_memory_bytes{device="cuda:0"} 1000.0' in text
    assert 'voxtral_gpu_memory_bytes{device="cuda:1"} 2000.0' in text
    assert 'voxtral_gpu_memory_peak_bytes{device="cuda:1"} 10000.0' in text


def _text(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


VLLM_LABELS = {"model_name": "tiny", "engine": "0"}


def vllm_gauges(samples: Samples) -> tuple[float, float, float]:
    """(waiting, running, KV cache usage) as a gateway's endpoint picker reads them."""
    return tuple(  # type: ignore[return-value]
        value(samples, f"vllm:{name}", **VLLM_LABELS)
        for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc")
    )


def test_vllm_gauges_at_idle_carry_vllms_labels(running: Any) -> None:
    with running.http() as http:
        samples = scrape(http)
    for name in VLLM_GAUGES:
        assert (name, tuple(sorted(VLLM_LABELS.items()))) in samples, name
    assert vllm_gauges(samples) == (0, 0, 0)


def test_vllm_gauges_while_a_stream_holds_a_slot_and_another_waits(running: Any) -> None:
    """The worker is held inside a decode step of one streaming chat: it runs, holding one of the plan's
    slots, and a second chat sent meanwhile waits in the queue. Released, both finish and all return to 0."""
    generator = running.generator.inner
    assert isinstance(generator, BatchGenerator)
    slots = generator.plan.slots
    stepping, release = threading.Event(), threading.Event()

    def hold(stage: str, rows: list[Any]) -> None:
        if stage == "step":
            stepping.set()
            release.wait(60)

    def send(stream: bool) -> None:
        with running.http() as client:
            chat(client, stream=stream)

    running.generator.fault = hold
    try:
        with running.http() as http, ThreadPoolExecutor(2) as pool:
            streaming = pool.submit(send, True)
            assert stepping.wait(60), "the streaming chat never reached a decode step"
            assert vllm_gauges(scrape(http)) == (0, 1, pytest.approx(1 / slots))
            queued = pool.submit(send, False)
            held = _until(lambda: scrape(http), lambda s: vllm_gauges(s)[0] == 1)
            assert vllm_gauges(held) == (1, 1, pytest.approx(1 / slots))
            release.set()
            streaming.result(timeout=60)
            queued.result(timeout=60)
            assert vllm_gauges(scrape(http)) == (0, 0, 0)
    finally:
        release.set()
        running.generator.fault = None


def _until(read: Any, done: Any, timeout_s: float = 60) -> Samples:
    """`read()` again until `done` holds of it (the second request reaches the queue on its own time)."""
    deadline = time.monotonic() + timeout_s
    while not done(samples := read()):
        assert time.monotonic() < deadline, "the condition never held"
    return samples
