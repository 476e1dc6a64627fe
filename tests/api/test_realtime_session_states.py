"""A streaming session's utterance state through the real app: whatever the client does mid-utterance
(session.update, a switch between server VAD and manual commits, input_audio_buffer.clear, a close while less
than 100 ms is held), the session holds at most one open stream, every `.completed` follows its `committed`,
and no stream is left open afterwards (issue 28's review, items 1-3)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from app.model.compute.loader import LoadedModel
from tests.api.test_realtime_stream_loop import CHUNK, MODEL, VAD, engine_steps, metrics, quiet
from tests.support.checks import wait_until
from tests.support.production_server import production
from tests.support.realtime_client import COMPLETED, Raw, encode, gap, open_session, sentence, texts
from tests.support.server import RunningServer, serve

COMMITTED = "input_audio_buffer.committed"


@pytest.fixture(scope="module")
def server(realtime_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve(realtime_model, tmp_path_factory.mktemp("rt-states"), model=MODEL) as running:
        yield running


def kinds(raw: Raw, kind: str) -> list[str]:
    return [e.get("item_id", "") for e in raw.events if e["type"] == kind]


def halves(data: bytes) -> tuple[bytes, bytes]:
    cut = len(data) // 2 // CHUNK * CHUNK
    return data[:cut], data[cut:]


def test_an_update_mid_utterance_keeps_its_stream(server: RunningServer, realtime_model: LoadedModel) -> None:
    """A session.update (language) while a manual utterance is fed: the commit answers that one utterance, with
    the model's text for all of its audio (the update neither drops nor forks it)."""
    data = encode(sentence(), "audio/pcm")
    first, second = halves(data)
    raw = open_session(server.base_url)
    raw.update(turn_detection=None)
    raw.append(first, CHUNK)
    raw.update(transcription={"model": MODEL, "language": "fr"})
    raw.append(second, CHUNK)
    raw.send(type="input_audio_buffer.commit")
    raw.until(COMPLETED, timeout=30)
    assert kinds(raw, COMPLETED) == kinds(raw, COMMITTED) and len(kinds(raw, COMMITTED)) == 1
    expected = "".join(step.text for step in engine_steps(realtime_model, data))
    assert [transcript for _, _, transcript in texts(raw.events)] == [expected]
    raw.ws.close()
    assert quiet(server)["voxtral_realtime_streams"] == 0


def test_vad_to_manual_mid_speech_commits_the_utterance_speech_started(server: RunningServer) -> None:
    """server_vad hears speech start, then the client turns VAD off and commits: one item, the one
    speech_started named, answered once; nothing left open."""
    first, second = halves(encode(np.concatenate([gap(0.5), sentence()]), "audio/pcm"))
    raw = open_session(server.base_url)
    raw.update(turn_detection=VAD)
    raw.append(first, CHUNK)
    started = raw.until("input_audio_buffer.speech_started", timeout=30)[-1]["item_id"]
    raw.update(turn_detection=None)
    raw.append(second, CHUNK)
    raw.send(type="input_audio_buffer.commit")
    raw.until(COMPLETED, timeout=30)
    assert kinds(raw, COMMITTED) == kinds(raw, COMPLETED) == [started]
    raw.ws.close()
    assert quiet(server)["voxtral_realtime_streams"] == 0


def test_manual_to_vad_mid_utterance_leaves_no_orphan_stream(server: RunningServer) -> None:
    """A manual utterance being fed when the client turns server_vad on: it is dropped (never committed), and
    the turns VAD then hears are each committed and answered, in order."""
    raw = open_session(server.base_url)
    raw.update(turn_detection=None)
    raw.append(halves(encode(sentence(), "audio/pcm"))[0], CHUNK)  # a stream opens for it
    raw.update(turn_detection=VAD)
    raw.append(encode(np.concatenate([gap(0.5), sentence(), gap(1.5)]), "audio/pcm"), CHUNK)
    raw.until(COMPLETED, timeout=30)
    assert kinds(raw, COMPLETED) == kinds(raw, COMMITTED) == kinds(raw, "input_audio_buffer.speech_started")
    raw.ws.close()
    assert quiet(server)["voxtral_realtime_streams"] == 0


def test_clear_then_more_audio_answers_only_what_followed(server: RunningServer) -> None:
    raw = open_session(server.base_url)
    raw.update(turn_detection=None)
    raw.append(halves(encode(sentence(), "audio/pcm"))[0], CHUNK)
    raw.send(type="input_audio_buffer.clear")
    raw.until("input_audio_buffer.cleared", timeout=30)
    raw.append(encode(sentence(), "audio/pcm"), CHUNK)
    raw.send(type="input_audio_buffer.commit")
    raw.until(COMPLETED, timeout=30)
    assert kinds(raw, COMPLETED) == kinds(raw, COMMITTED) and len(kinds(raw, COMMITTED)) == 1
    raw.ws.close()
    assert quiet(server)["voxtral_realtime_streams"] == 0


@pytest.mark.parametrize("vad", [None, VAD])
def test_an_idle_close_with_under_100_ms_held_sends_no_completed(
    realtime_model: LoadedModel, tmp_path: Path, vad: dict[str, Any] | None
) -> None:
    """Idle with 60 ms of audio held (manual: an open stream; VAD: nothing heard): the session closes (1000)
    without a `committed` and so without a `.completed`, and its stream is closed."""
    with serve(realtime_model, tmp_path, model=MODEL, realtime_idle_timeout_s=0.5) as running:
        raw = open_session(running.base_url)
        raw.update(turn_detection=vad)
        raw.append(encode(sentence()[: 16000 * 60 // 1000], "audio/pcm"), CHUNK)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                raw.recv(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        assert [e["error"]["code"] for e in raw.events if e["type"] == "error"] == ["idle_timeout"]
        assert kinds(raw, COMMITTED) == kinds(raw, COMPLETED) == []
        assert quiet(running)["voxtral_realtime_streams"] == 0


def test_a_drain_with_under_100_ms_held_sends_no_completed(realtime_model: LoadedModel, tmp_path: Path) -> None:
    """A drain (SIGTERM) while a manual utterance holds 60 ms: closed 1001 with no `committed` nor `.completed`."""
    with production(realtime_model, tmp_path, model=MODEL) as running:
        raw = open_session(running.base_url)
        raw.update(turn_detection=None)
        raw.append(encode(sentence()[: 16000 * 60 // 1000], "audio/pcm"), CHUNK)
        running.server.handle_exit(signal.SIGTERM, None)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                raw.recv(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert kinds(raw, COMMITTED) == kinds(raw, COMPLETED) == []


def test_the_session_object_expires_with_the_session_limit_and_omits_an_unset_delay(
    realtime_model: LoadedModel, tmp_path: Path
) -> None:
    """`expires_at` is when --realtime-max-session-s ends the session; `delay` (a non-nullable enum) is left out
    until the client sets it."""
    with serve(realtime_model, tmp_path, model=MODEL, realtime_max_session_s=120.0) as running:
        opened = time.time()
        raw = open_session(running.base_url)
        created = raw.events[0]["session"]
        assert abs(created["expires_at"] - (opened + 120)) <= 5
        assert "delay" not in created["audio"]["input"]["transcription"]
        updated = raw.update(transcription={"model": MODEL, "delay": "low"})["session"]
        assert updated["expires_at"] == created["expires_at"]
        assert updated["audio"]["input"]["transcription"]["delay"] == "low"
        raw.ws.close()


def test_vllm_scheduler_gauges_count_the_streams(server: RunningServer) -> None:
    """A gateway's endpoint picker reads vLLM's gauges: on a realtime model, the streams open (running), none
    waiting, and the stream slots held (KV cache usage)."""

    def gauge(name: str) -> float:
        return next(value for key, value in metrics(server).items() if key.startswith(name))

    quiet(server)
    assert gauge("vllm:num_requests_running") == 0
    raw = open_session(server.base_url)
    raw.update(turn_detection=None)
    raw.append(halves(encode(sentence(), "audio/pcm"))[0], CHUNK)  # a stream opens for it
    wait_until(lambda: gauge("vllm:num_requests_running") == 1, "the stream is counted", poll_s=0.05)
    assert gauge("vllm:num_requests_waiting") == 0
    assert gauge("vllm:kv_cache_usage_perc") == pytest.approx(1 / 32)
    raw.ws.close()
    quiet(server)
    assert gauge("vllm:kv_cache_usage_perc") == 0
