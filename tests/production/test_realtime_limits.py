"""/v1/realtime limits and lifecycle: sessions at once, message size, events a second, the longest utterance,
idle sessions, a client that reads slowly, and a drain that answers the utterance in progress before closing."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from app.api.lifecycle import DrainGuard, Lifecycle
from app.model.compute.loader import LoadedModel
from app.types import PreparedRequest
from tests.support.checks import wait_until
from tests.support.production_server import production
from tests.support.realtime_client import (
    COMPLETED,
    Raw,
    encode,
    gap,
    never_reading,
    open_session,
    sentence,
    texts,
    two_utterances,
)
from tests.support.server import RunningServer, serve


@pytest.fixture(scope="module")
def limited(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    limits = {"realtime_max_sessions": 1, "realtime_max_message_mb": 0.01, "realtime_max_utterance_s": 1.0}
    with serve(loaded, tiny_dir, realtime_max_pending_events=1, **limits) as running:
        yield running


def ws_url(server: Any) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def test_sessions_over_the_limit_are_refused_at_the_upgrade(limited: RunningServer) -> None:
    first = open_session(limited.base_url)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(limited))
    assert refused.value.response.status_code == 429
    error = json.loads(refused.value.response.body or b"")["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "too_many_sessions")
    first.ws.close()
    wait_until(lambda: limited.context.realtime.slots.open == 0, "the first session is closed")
    open_session(limited.base_url).ws.close()
    wait_until(lambda: limited.context.realtime.slots.open == 0, "the second session is closed")


def test_refused_upgrades_are_logged_once_a_while_without_a_traceback(
    loaded: LoadedModel, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can knock: refusals are at most one line per status every 10 s, at info or warning, never an
    error with a traceback; the line after a quiet spell says how many were not logged; the 429 says when to
    retry."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="uvicorn.error")  # a server run by `serve` leaves it at warning
    with production(loaded, tiny_dir, api_keys=["sk-good"], realtime_max_sessions=1) as running:
        now = [0.0]
        running.server.config.ws.refusals.clock = lambda: now[0]
        good = {"additional_headers": {"Authorization": "Bearer sk-good"}}
        first = Raw(connect(ws_url(running), **good))  # type: ignore[arg-type]
        assert first.recv()["type"] == "session.created"
        caplog.clear()
        statuses = []
        for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer sk-bad"}}, good) * 2:
            with pytest.raises(InvalidStatus) as refused:
                connect(ws_url(running), **kwargs)  # type: ignore[arg-type]
            statuses.append(refused.value.response.status_code)
            if statuses[-1] == 429:
                assert refused.value.response.headers["Retry-After"] == "1"
        now[0] = 10.0  # the next 401 is logged again, with a count of those held back
        with pytest.raises(InvalidStatus):
            connect(ws_url(running))
        first.ws.close()
        wait_until(lambda: running.context.realtime.slots.open == 0, "the session is closed")
    assert statuses == [401, 401, 429] * 2
    said = [r for r in caplog.records if r.levelno >= logging.INFO]
    lines = [r.getMessage() for r in said if "/v1/realtime" in r.getMessage() and "accepted" not in r.getMessage()]
    assert [line.split('" ', 1)[1] for line in lines] == [
        "401",
        "429",
        "401 (3 more refused with it since the last line)",
    ], lines
    assert not [r for r in said if "rejected" in r.getMessage()]  # once: websockets' repeat is at debug
    assert all(r.levelno in (logging.INFO, logging.WARNING) for r in said if "/v1/realtime" in r.getMessage())
    server_side = [r for r in said if not r.name.startswith("websockets.client")]
    loud = [r for r in server_side if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [(r.name, r.getMessage()) for r in loud]


def test_an_event_over_the_size_limit_gets_an_error_and_the_session_goes_on(limited: RunningServer) -> None:
    raw = open_session(limited.base_url)
    raw.send(type="input_audio_buffer.append", audio=base64.b64encode(bytes(12_000)).decode(), event_id="big")
    assert raw.until("error")[-1]["error"]["code"] == "message_too_large"
    assert raw.update(turn_detection=None)["type"] == "session.updated"
    raw.ws.close()
    wait_until(lambda: limited.context.realtime.slots.open == 0, "the session is closed")


def test_a_session_sending_past_its_rate_is_paced_and_loses_nothing(loaded: LoadedModel, tiny_dir: Path) -> None:
    """Past --realtime-max-events-per-s (after its burst) the server leaves the session's socket unread a while:
    every event is still answered, in order, none refused; another session is answered meanwhile."""
    with serve(loaded, tiny_dir, realtime_max_events_per_s=20, realtime_events_burst=10) as running:
        fast, other = open_session(running.base_url), open_session(running.base_url)
        for n in range(50):
            fast.send(type="input_audio_buffer.clear", event_id=f"c{n}")
        started = time.monotonic()
        other.send(type="input_audio_buffer.clear")
        other.until("input_audio_buffer.cleared")
        other_took = time.monotonic() - started
        events = fast.until("input_audio_buffer.cleared", 50)
        fast_took = time.monotonic() - started
        assert [e["type"] for e in events] == ["input_audio_buffer.cleared"] * 50  # no error event
        assert fast_took >= 1.5  # 40 events past the burst at 20 a second: 2 s, less what was read meanwhile
        assert other_took < fast_took / 2
        metrics = running.context.metrics.registry
        assert metrics.get_sample_value("voxtral_realtime_throttled_events_total") >= 30
        assert 1.5 <= metrics.get_sample_value("voxtral_realtime_throttled_seconds_total") <= fast_took
        for raw in (fast, other):
            raw.ws.close()
        wait_until(lambda: running.context.realtime.slots.open == 0, "the sessions are closed")


def test_the_longest_utterance_is_cut_and_committed(limited: RunningServer) -> None:
    raw = open_session(limited.base_url)
    raw.append(encode(np.concatenate([gap(0.5), sentence(), gap(1.0)]), "audio/pcm"), 2400)  # VAD on: the default
    events = raw.until(COMPLETED, 3)  # 2.9 s of speech, 1 s at most each
    started, stopped = of(events, "input_audio_buffer.speech_started"), of(events, "input_audio_buffer.speech_stopped")
    assert len(started) >= 3 and len(stopped) >= 3
    assert stopped[0]["audio_end_ms"] - started[0]["audio_start_ms"] == 1000
    assert started[1]["audio_start_ms"] == stopped[0]["audio_end_ms"]  # speech went on: the next one starts there
    raw.update(turn_detection=None)  # by hand, too: no commit needed past the limit
    raw.append(encode(sentence(), "audio/pcm"), 2400)
    manual = raw.until("input_audio_buffer.committed", 2)
    assert not of(manual, "input_audio_buffer.speech_started")
    raw.ws.close()
    wait_until(lambda: limited.context.realtime.slots.open == 0, "the session is closed")


def test_a_client_reading_late_loses_nothing(limited: RunningServer) -> None:
    """One event of room between the session and the socket: the session waits for the client instead of
    buffering, and every utterance still arrives, in order."""
    audio, _ = two_utterances()
    raw = open_session(limited.base_url)
    raw.update(turn_detection={"type": "server_vad", "silence_duration_ms": 500})
    raw.append(encode(audio, "audio/pcm"), 4800)
    events = raw.until(COMPLETED, 2)
    committed = [e["item_id"] for e in of(events, "input_audio_buffer.committed")]
    assert [item for item, _, _ in texts(events)] == committed[:2]
    raw.ws.close()
    wait_until(lambda: limited.context.realtime.slots.open == 0, "the session is closed")


def test_an_idle_session_is_closed(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, realtime_idle_timeout_s=0.5) as running:
        raw = open_session(running.base_url)
        assert raw.until("error")[-1]["error"]["code"] == "idle_timeout"
        with pytest.raises(ConnectionClosed) as closed:
            raw.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_a_drain_answers_the_utterance_in_progress_then_closes(loaded: LoadedModel, tiny_dir: Path) -> None:
    with production(loaded, tiny_dir, drain_timeout_s=30, header_read_timeout_s=0.3) as running:
        raw = Raw(connect(ws_url(running)))
        assert raw.recv()["type"] == "session.created"
        opened = time.monotonic()  # the HTTP head deadline must not cut the socket once it is a WebSocket
        wait_until(lambda: time.monotonic() > opened + 1.0, "the head deadline has long passed")
        raw.append(encode(np.concatenate([gap(0.3), sentence()]), "audio/pcm"), 4800)  # no pause at the end
        raw.until("input_audio_buffer.speech_started")
        running.server.handle_exit(signal.SIGTERM, None)
        events = raw.until(COMPLETED)
        assert of(events, "input_audio_buffer.speech_stopped") and of(events, "input_audio_buffer.committed")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                raw.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # going away: reconnect elsewhere
        running.thread.join(30)
        assert not running.thread.is_alive()


def test_upgrades_during_a_drain_are_refused_with_503() -> None:
    async def upgrade() -> list[dict[str, Any]]:
        lifecycle = Lifecycle()
        lifecycle.draining = True
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def never(*_: Any) -> None:
            raise AssertionError("the app must not run")

        guard = DrainGuard(never, lifecycle)
        await guard({"type": "websocket", "path": "/v1/realtime"}, never, send)
        return sent

    start, body = asyncio.run(upgrade())
    assert start["type"] == "websocket.http.response.start" and start["status"] == 503
    assert json.loads(body["body"])["error"]["code"] == "shutting_down"


def test_a_failed_transcription_is_a_failed_event_and_the_session_goes_on(limited: RunningServer) -> None:
    failures: list[int] = []

    def fail_once(stage: str, items: list[Any]) -> None:
        if stage == "prefill" and not failures:
            failures.append(len(items))
            raise RuntimeError("injected model failure")

    raw = open_session(limited.base_url)
    raw.update(turn_detection=None)
    speech = encode(sentence()[:12800], "audio/pcm")  # 0.8 s: under this server's 1 s utterance limit
    limited.generator.fault = fail_once
    try:
        raw.append(speech, 4800)
        raw.send(type="input_audio_buffer.commit")
        failed = raw.until("conversation.item.input_audio_transcription.failed")[-1]
        assert failed["error"]["type"] == "server_error" and "Traceback" not in failed["error"]["message"]
        raw.append(speech, 4800)
        raw.send(type="input_audio_buffer.commit")
        assert raw.until(COMPLETED)[-1]["item_id"] != failed["item_id"]
    finally:
        limited.generator.fault = None
    assert failures == [1]
    raw.ws.close()
    wait_until(lambda: limited.context.realtime.slots.open == 0, "the session is closed")


def test_a_client_that_leaves_too_much_unread_is_closed_with_1008(loaded: LoadedModel, tiny_dir: Path) -> None:
    """The outbox is bounded in bytes, whatever the events' sizes: a client that sends and never reads (a raw
    socket with a tiny receive window, so unread events pile up on the server) is closed with 1008 and a
    reason, and its session's place is freed."""
    with serve(loaded, tiny_dir, realtime_max_pending_mb=0.05) as running:
        update = {"type": "transcription", "audio": {"input": {"transcription": {"prompt": "p" * 4000}}}}
        closed = never_reading(ws_url(running), json.dumps({"type": "session.update", "session": update}).encode())
        assert closed is not None, "the server never closed the session"
        assert (closed.code, closed.reason) == (1008, "slow reader: too many events unread")
        wait_until(lambda: running.context.realtime.slots.open == 0, "the session's place is freed")


def test_a_session_that_leaves_mid_utterance_frees_its_audio_without_the_collector(
    loaded: LoadedModel, tiny_dir: Path
) -> None:
    """Its utterances' tokenized audio (2 MB a 30 s window) and its buffer are freed by reference counting once
    the session ends, not at the garbage collector's next full pass: no reference cycle holds them (a
    cancelled task's error held its frames; a raised error held the frame that raised it)."""
    with serve(loaded, tiny_dir) as running:
        gc.collect()
        gc.disable()
        try:
            raw = open_session(running.base_url)
            raw.update(turn_detection=None)
            speech = encode(np.concatenate([sentence(), gap(0.2)]), "audio/pcm")
            for _ in range(3):
                raw.append(speech, 4800)
                raw.send(type="input_audio_buffer.commit")
            raw.until("input_audio_buffer.committed", 3)
            raw.append(speech, 4800)  # uncommitted audio in the buffer
            raw.ws.close()
            wait_until(lambda: running.context.realtime.slots.open == 0 and running.engine.idle, "all is over")
            # A frame that has answered may hold its last request a moment longer (the worker's loop, the
            # session's task) until it moves on; with the collector off, one in a reference cycle never goes.
            wait_until(
                lambda: not [o for o in gc.get_objects() if isinstance(o, PreparedRequest)],
                "no prepared request is left",
                timeout_s=10.0,
                poll_s=0.05,
            )
        finally:
            gc.enable()
