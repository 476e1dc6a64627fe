"""Fair sharing, through real sockets and HTTP against the real app (issue 32, point 1): a session that floods
commits is refused past its share while another session's utterances all complete; over HTTP an API key past
its share of the queue gets a 429 `rate_limit_exceeded` while another key is still served; the realtime sessions
of one key share that key's places."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.model.compute.loader import LoadedModel
from tests.support.checks import assert_openai_error, wait_until
from tests.support.realtime_client import COMPLETED, Raw, encode, gap, open_session, sentence
from tests.support.server import RunningServer, serve

FAILED = "conversation.item.input_audio_transcription.failed"
PENDING = 4


@pytest.fixture(scope="module")
def fair(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, realtime_max_pending_utterances=PENDING) as running:
        yield running


def _answers(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] in (COMPLETED, FAILED)]


def test_a_flooding_session_is_refused_past_its_share_and_the_others_lose_nothing(fair: RunningServer) -> None:
    flood, good = open_session(fair.base_url), open_session(fair.base_url)
    for raw in (flood, good):
        raw.update(turn_detection=None)
    chunk = encode(gap(0.1) + 0.01, "audio/pcm")  # 100 ms each
    for _ in range(60):  # all sent before reading anything
        flood.append(chunk, len(chunk))
        flood.send(type="input_audio_buffer.commit")
    speech = encode(np.concatenate([sentence(), gap(0.2)]), "audio/pcm")
    for _ in range(3):
        good.append(speech, 4800)
        good.send(type="input_audio_buffer.commit")

    good_events = good.until(COMPLETED, 3)
    assert not [e for e in good_events if e["type"] in (FAILED, "error")]
    assert all(e["transcript"] for e in good_events if e["type"] == COMPLETED)

    flooded: list[dict[str, Any]] = []
    while len(_answers(flooded)) < 60:
        flooded.append(flood.recv())
    committed = [e["item_id"] for e in flooded if e["type"] == "input_audio_buffer.committed"]
    answers = _answers(flooded)
    assert [e["item_id"] for e in answers] == committed  # every commit answered, in commit order
    assert all(e["type"] == COMPLETED for e in answers[:PENDING])  # its share always runs
    refused = [e for e in answers if e["type"] == FAILED]
    assert len(refused) >= 30  # the rest is refused, but for what was answered meanwhile
    assert {e["error"]["code"] for e in refused} == {"rate_limit_exceeded"}
    assert not [e for e in flooded if e["type"] == "error"]
    metrics = fair.context.metrics.registry
    assert metrics.get_sample_value("voxtral_refusals_total", {"reason": "session_pending"}) == len(refused)

    flood.append(speech, 4800)  # the session goes on: a later commit runs
    flood.send(type="input_audio_buffer.commit")
    assert flood.until(COMPLETED)[-1]["type"] == COMPLETED
    for raw in (flood, good):
        raw.ws.close()
    wait_until(lambda: fair.context.realtime.slots.open == 0, "the sessions are closed")


@pytest.fixture(scope="module")
def keyed(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, api_keys=["sk-a", "sk-b"], max_queued_per_client=1) as running:
        yield running


def _chat(server: RunningServer, key: str) -> httpx.Response:
    body = {"model": server.context.settings.model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        return http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_an_api_key_past_its_share_of_the_queue_gets_429_while_another_key_is_served(keyed: RunningServer) -> None:
    entered, release = threading.Event(), threading.Event()

    def hold(stage: str, rows: list[Any]) -> None:
        if stage == "prefill" and not release.is_set():
            entered.set()
            release.wait(30)

    keyed.generator.fault = hold  # type: ignore[union-attr]
    answers: dict[str, httpx.Response] = {}

    def send(name: str, key: str) -> None:
        answers[name] = _chat(keyed, key)

    threads = [threading.Thread(target=send, args=("running", "sk-a"))]
    try:
        threads[0].start()
        assert entered.wait(30)  # sk-a's first request is in the model, not queued
        threads.append(threading.Thread(target=send, args=("queued", "sk-a")))
        threads[-1].start()
        wait_until(lambda: keyed.engine.waiting == 1, "sk-a's second request is queued")
        refused = _chat(keyed, "sk-a")
        error = assert_openai_error(refused, 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert refused.headers["Retry-After"] == "1"
        assert "sk-a" not in error["message"]
        threads.append(threading.Thread(target=send, args=("other", "sk-b")))
        threads[-1].start()
        wait_until(lambda: keyed.engine.waiting == 2, "sk-b's request is queued beside it")
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
        keyed.generator.fault = None  # type: ignore[union-attr]
    assert {name: r.status_code for name, r in answers.items()} == {"running": 200, "queued": 200, "other": 200}
    metrics = keyed.context.metrics.registry
    assert metrics.get_sample_value("voxtral_refusals_total", {"reason": "client_queued"}) == 1


def _manual(server: RunningServer, key: str) -> Raw:
    raw = open_session(server.base_url, additional_headers={"Authorization": f"Bearer {key}"})
    raw.update(turn_detection=None)
    return raw


def _say(raw: Raw) -> None:
    raw.append(encode(np.concatenate([sentence(), gap(0.2)]), "audio/pcm"), 4800)
    raw.send(type="input_audio_buffer.commit")


def test_the_realtime_sessions_of_one_key_share_its_places_in_the_queue(keyed: RunningServer) -> None:
    """--max-queued-per-client 1: sk-a's first session holds one utterance in the model and one queued, so a
    second session of sk-a is refused (as another HTTP request of sk-a would be) while sk-b's is queued."""
    entered, release = threading.Event(), threading.Event()

    def hold(stage: str, rows: list[Any]) -> None:
        if stage == "prefill" and not release.is_set():
            entered.set()
            release.wait(30)

    first, second, other = _manual(keyed, "sk-a"), _manual(keyed, "sk-a"), _manual(keyed, "sk-b")
    metrics = keyed.context.metrics.registry
    refusals_before = metrics.get_sample_value("voxtral_refusals_total", {"reason": "client_queued"}) or 0
    keyed.generator.fault = hold  # type: ignore[union-attr]
    try:
        _say(first)
        assert entered.wait(30)  # sk-a's first utterance is in the model, not queued
        _say(first)
        wait_until(lambda: keyed.engine.waiting == 1, "sk-a's second utterance is queued")
        _say(second)
        refused = second.until(FAILED)[-1]
        assert refused["error"]["code"] == "rate_limit_exceeded"
        _say(other)
        wait_until(lambda: keyed.engine.waiting == 2, "sk-b's utterance is queued beside it")
    finally:
        release.set()
        keyed.generator.fault = None  # type: ignore[union-attr]
    assert [e["type"] for e in _answers(first.until(COMPLETED, 2))] == [COMPLETED] * 2
    assert [e["type"] for e in _answers(other.until(COMPLETED))] == [COMPLETED]
    _say(second)  # once sk-a's are answered, its second session is served
    assert _answers(second.until(COMPLETED))[-1]["type"] == COMPLETED
    assert metrics.get_sample_value("voxtral_refusals_total", {"reason": "client_queued"}) == refusals_before + 1
    for raw in (first, second, other):
        raw.ws.close()
    wait_until(lambda: keyed.context.realtime.slots.open == 0, "the sessions are closed")
