"""/v1/realtime as clients speak it over a raw WebSocket: server VAD and manual commits in every input
format, error events, keys by header and by subprotocol. Every server event is checked against OpenAI's
schemas when OPENAI_OPENAPI_SPEC names the spec (see `tests/support/realtime_client.py`)."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from app.api.realtime.protocol import MAX_PROMPT_CHARS
from app.api.realtime.route import Connection
from app.model.compute.loader import LoadedModel
from tests.support.checks import wait_until
from tests.support.realtime_client import (
    COMPLETED,
    Raw,
    chunk_bytes,
    encode,
    gap,
    open_session,
    sentence,
    spec,
    texts,
    two_utterances,
)
from tests.support.server import AUDIO, RunningServer, serve

KEY = "sk-realtime-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FORMATS = ["audio/pcm", "audio/pcmu", "audio/pcma"]


@pytest.fixture(scope="module")
def server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, api_keys=[KEY], max_batch_size=16) as running:
        yield running


def session(server: RunningServer, **kwargs: Any) -> Raw:
    return open_session(server.base_url, additional_headers=AUTH, **kwargs)


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == f"input_audio_buffer.{kind}"]


def test_server_events_are_checked_against_openais_schemas() -> None:
    if spec() is None:
        pytest.skip("OPENAI_OPENAPI_SPEC is unset: server events are not validated against OpenAI's schemas")
    assert "RealtimeServerEventError" in spec()["components"]["schemas"]  # type: ignore[index]


def test_session_created_then_updated_with_the_effective_configuration(server: RunningServer) -> None:
    raw = session(server)
    created = raw.events[0]["session"]
    assert created["type"] == "transcription" and created["object"] == "realtime.transcription_session"
    assert created["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # OpenAI's default
    vad = {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200, "silence_duration_ms": 700}
    updated = raw.update(format={"type": "audio/pcmu"}, transcription={"model": "tiny", "language": "fr"})
    assert updated["session"]["id"] == created["id"]
    after = raw.update(turn_detection=vad)["session"]["audio"]["input"]
    assert after["format"] == {"type": "audio/pcmu"} and after["turn_detection"] == vad
    assert after["transcription"] == {"model": "tiny", "language": "fr"}  # kept: not in this update
    raw.ws.close()


@pytest.mark.parametrize("audio_format", FORMATS)
def test_server_vad_commits_each_utterance_and_answers_in_order(server: RunningServer, audio_format: str) -> None:
    audio, spans = two_utterances()
    raw = session(server)
    fmt = {"type": audio_format} | ({"rate": 24000} if audio_format == "audio/pcm" else {})
    raw.update(format=fmt, turn_detection={"type": "server_vad", "silence_duration_ms": 500})
    raw.append(encode(audio, audio_format), chunk_bytes(audio_format))
    events = raw.until(COMPLETED, 2)
    started, stopped, committed = of(events, "speech_started"), of(events, "speech_stopped"), of(events, "committed")
    assert len(started) == len(stopped) == len(committed) == 2, events
    for (a, b), start, stop, commit in zip(spans, started, stopped, committed, strict=True):
        assert start["item_id"] == stop["item_id"] == commit["item_id"]
        assert abs(start["audio_start_ms"] / 1000 - (a - 0.3)) <= 0.5, (a, start)  # prefix_padding_ms: 300
        assert abs(stop["audio_end_ms"] / 1000 - (b + 0.5)) <= 0.5, (b, stop)  # includes silence_duration_ms
    assert committed[0]["previous_item_id"] is None and committed[1]["previous_item_id"] == committed[0]["item_id"]
    answered = list(texts(events))
    assert [item for item, _, _ in answered] == [c["item_id"] for c in committed]  # in commit order
    assert all(deltas == transcript for _, deltas, transcript in answered)
    usage = [e["usage"] for e in events if e["type"] == COMPLETED]
    assert all(u["type"] == "tokens" and u["input_tokens"] > 0 for u in usage)
    raw.ws.close()


def test_manual_commits_and_clear(server: RunningServer) -> None:
    raw = session(server)
    assert (
        raw.update(format={"type": "audio/pcma"}, turn_detection=None)["session"]["audio"]["input"]["turn_detection"]
        is None
    )
    raw.send(type="input_audio_buffer.commit", event_id="empty")
    error = raw.until("error")[-1]["error"]
    assert (error["code"], error["event_id"]) == ("input_audio_buffer_commit_empty", "empty")
    speech = encode(sentence(), "audio/pcma")
    raw.append(speech, 800)
    raw.send(type="input_audio_buffer.clear")
    raw.until("input_audio_buffer.cleared")
    for _ in range(2):
        raw.append(speech, 800)
        raw.send(type="input_audio_buffer.commit")
    events = raw.until(COMPLETED, 2)
    assert not of(events, "speech_started") and len(of(events, "committed")) == 2
    assert [item for item, _, _ in texts(events)] == [c["item_id"] for c in of(events, "committed")]
    raw.ws.close()


def update(**session: Any) -> dict[str, Any]:
    return {"type": "session.update", "session": {"type": "transcription", **session}}


REFUSED = [
    ({"type": "response.create"}, "type"),
    ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "audio"),
    ({"type": "input_audio_buffer.append"}, "audio"),
    (update(type="realtime"), "session.type"),
    (update(audio={"input": {"format": {"type": "audio/wav"}}}), None),
    (update(audio={"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}}), None),
    (update(audio={"input": {"turn_detection": {"type": "model_vad"}}}), None),
    (update(audio={"input": {"noise_reduction": {"type": "studio"}}}), "session.audio.input.noise_reduction.type"),
    (update(audio={"input": {"transcription": {"model": "nope"}}}), None),
    (update(audio={"input": {"transcription": {"language": "xx"}}}), None),
    (update(include=["item.input_audio_transcription.avg_logprob"]), "session.include"),
]


def test_refused_events_get_error_events_and_the_session_goes_on(server: RunningServer) -> None:
    raw = session(server)
    for index, (event, param) in enumerate(REFUSED):
        raw.send(**event, event_id=f"bad-{index}")
        error = raw.until("error")[-1]["error"]
        assert error["event_id"] == f"bad-{index}" and error["type"] == "invalid_request_error", (event, error)
        assert error["param"] == param or (param is None and error["param"].startswith("session.audio.input")), error
    raw.ws.send("{not json")
    raw.ws.send(b"\x00\x01")
    assert [raw.until("error")[-1]["error"]["message"] for _ in range(2)]
    raw.update(turn_detection=None)  # and the session still transcribes
    raw.append(encode(sentence(), "audio/pcm"), 4800)
    raw.send(type="input_audio_buffer.commit")
    assert raw.until(COMPLETED)[-1]["transcript"] is not None
    raw.ws.close()


def test_refused_settings_leave_the_session_its_config(server: RunningServer) -> None:
    """As OpenAI answers a value it does not take: an error event naming it, and the update is not applied."""
    raw = session(server)
    semantic = {"type": "semantic_vad", "eagerness": "low"}
    before = raw.update(turn_detection=semantic)["session"]["audio"]["input"]
    assert before["turn_detection"] == semantic and "noise_reduction" not in before
    for kind in ("studio", "none"):
        raw.send(**update(audio={"input": {"noise_reduction": {"type": kind}, "turn_detection": None}}), event_id=kind)
        error = raw.until("error")[-1]["error"]
        assert (error["param"], error["event_id"]) == ("session.audio.input.noise_reduction.type", kind), error
    assert raw.update()["session"]["audio"]["input"] == before  # the effective configuration, unchanged
    assert raw.update(noise_reduction=None)["session"]["audio"]["input"] == before  # null: none asked for
    transcribes(raw)
    raw.ws.close()


def noisy(speech: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """`speech` with white noise at `snr_db` (against the speech's own power) over it and around it."""
    audio = np.concatenate([gap(0.8), speech, gap(1.5)])
    noise = np.random.default_rng(seed).standard_normal(audio.shape[0]).astype(np.float32)
    power = float(np.mean(speech**2)) / 10 ** (snr_db / 10)
    return (audio + noise * np.sqrt(power / np.mean(noise**2))).astype(np.float32)


@pytest.mark.parametrize(
    ("kind", "other", "snr"), [("near_field", "far_field", 10.0), ("far_field", "near_field", 0.0)]
)
def test_noise_reduction_is_echoed_and_noisy_speech_transcribes(
    server: RunningServer, kind: str, other: str, snr: float
) -> None:
    """A sentence in white noise at 10 or 0 dB SNR (noise in the pauses too), server VAD: one utterance, its
    edges near the sentence's, transcribed; switching type and then to null is echoed each time."""
    raw = session(server)
    echoed = raw.update(noise_reduction={"type": kind}, turn_detection={"type": "server_vad"})
    assert echoed["session"]["audio"]["input"]["noise_reduction"] == {"type": kind}
    speech = sentence()
    raw.append(encode(noisy(speech, snr), "audio/pcm"), chunk_bytes("audio/pcm"))
    events = raw.until(COMPLETED)
    started, stopped = of(events, "speech_started"), of(events, "speech_stopped")
    assert len(started) == len(stopped) == 1, events
    length = speech.shape[0] / 16000
    assert 0.8 - 0.3 - 0.2 <= started[0]["audio_start_ms"] / 1000 <= 0.8 - 0.3 + 0.2, started  # prefix padding 300
    assert 0.8 + length <= stopped[0]["audio_end_ms"] / 1000 <= 0.8 + length + 0.5 + 0.3, stopped
    assert events[-1]["transcript"] is not None
    assert raw.update(noise_reduction={"type": other})["session"]["audio"]["input"]["noise_reduction"] == {
        "type": other
    }
    assert "noise_reduction" not in raw.update(noise_reduction=None)["session"]["audio"]["input"]  # off
    transcribes(raw)
    raw.ws.close()


def test_semantic_vad_ends_each_turn_and_transcribes(server: RunningServer) -> None:
    """Two sentences 3 s apart with eagerness high: each turn ends, at the latest 2 s after speech stops."""
    speech = sentence()
    length = speech.shape[0] / 16000
    audio = np.concatenate([gap(0.5), speech, gap(3.0), speech, gap(3.0)])
    raw = session(server)
    echoed = raw.update(turn_detection={"type": "semantic_vad", "eagerness": "high", "create_response": True})
    assert echoed["session"]["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "high"}
    raw.append(encode(audio, "audio/pcm"), chunk_bytes("audio/pcm"))
    events = raw.until(COMPLETED, 2)
    started, stopped, committed = of(events, "speech_started"), of(events, "speech_stopped"), of(events, "committed")
    assert len(started) == len(stopped) == len(committed) == 2, events
    for end, stop in zip((0.5 + length, 3.5 + 2 * length), stopped, strict=True):
        assert end + 0.1 <= stop["audio_end_ms"] / 1000 <= end + 2.0 + 0.5, (end, stop)
    assert [item for item, _, _ in texts(events)] == [c["item_id"] for c in committed]
    raw.ws.close()


def test_semantic_vad_ends_a_finished_sentence_at_its_pause_not_after_the_wait(server: RunningServer) -> None:
    """Real speech ending at a full stop (jfk.wav, 11 s): the turn-end model ends the turn at the first pause
    after it, long before eagerness low's 8 s; pauses inside the speech it judges unfinished do not cut it."""
    jfk = np.asarray(sf.read(AUDIO / "jfk.wav", dtype="float32")[0])
    raw = session(server)
    raw.update(turn_detection={"type": "semantic_vad", "eagerness": "low"})
    raw.append(encode(np.concatenate([jfk, gap(9.0)]), "audio/pcm"), chunk_bytes("audio/pcm"))
    events = raw.until("input_audio_buffer.speech_stopped")
    stopped = events[-1]["audio_end_ms"] / 1000
    assert stopped < 12.0, (stopped, events)  # speech ends at ~10.7 s; the 8 s wait would end it at ~18.5 s
    assert len(of(events, "speech_started")) == 1 and len(of(events, "committed")) == 0
    raw.until(COMPLETED)
    raw.ws.close()


def transcribes(raw: Raw) -> None:
    """The session still transcribes: a manual commit of a sentence gets its `.completed`."""
    raw.update(turn_detection=None)
    raw.append(encode(sentence(), "audio/pcm"), 4800)
    raw.send(type="input_audio_buffer.commit")
    assert raw.until(COMPLETED)[-1]["transcript"] is not None


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_json_nested_too_deeply_gets_an_error_and_the_session_goes_on(
    server: RunningServer, opening: str, caplog: pytest.LogCaptureFixture
) -> None:
    """200 KB of brackets makes Python's parser recurse past its limit: an error event, not a closed socket
    (nor a task left pending)."""
    caplog.set_level(logging.WARNING)
    raw = session(server)
    raw.ws.send(opening * (200_000 // len(opening)))
    error = raw.until("error")[-1]["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json"), error
    transcribes(raw)
    raw.ws.close()
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


def test_a_bug_closes_the_session_with_1011_and_leaves_no_task_pending(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug while handling an event ends the session with 1011 (logged), its utterances cancelled."""
    handle = Connection._handle

    async def buggy(self: Connection, message: Any) -> None:
        if message.get("text") == '"bug"':
            raise RuntimeError("a bug")
        await handle(self, message)

    monkeypatch.setattr(Connection, "_handle", buggy)
    caplog.set_level(logging.WARNING)
    raw = session(server)
    raw.update(turn_detection=None)
    raw.append(encode(sentence(), "audio/pcm"), 4800)
    raw.send(type="input_audio_buffer.commit")  # an utterance in flight when the bug strikes
    raw.ws.send('"bug"')
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            raw.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    wait_until(lambda: server.context.realtime.slots.open == 0, "the session is closed")
    gc.collect()  # a task left pending would now be reported destroyed
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("realtime session"), errors


def test_strings_over_their_limit_are_refused_naming_the_field(server: RunningServer) -> None:
    """A 0.9 MB prompt would be echoed in every session.updated: refused, and the session keeps its config."""
    raw = session(server)
    raw.update(transcription={"language": "fr", "prompt": "p" * MAX_PROMPT_CHARS})
    field = "session.audio.input.transcription."
    for name, value in (("prompt", "p" * 900_000), ("language", "f" * 200), ("model", "m" * 2000)):
        raw.send(**update(audio={"input": {"transcription": {name: value}}}), event_id=f"long-{name}")
        error = raw.until("error")[-1]["error"]
        assert (error["param"], error["event_id"], error["code"]) == (
            field + name,
            f"long-{name}",
            "string_above_max_length",
        ), error
    raw.send(**update(type="t" * 1000), event_id="long-type")
    assert raw.until("error")[-1]["error"]["param"] == "session.type"
    raw.send(type="t" * 900_000)  # an unknown type is quoted in the message, cut short
    assert len(json.dumps(raw.until("error")[-1])) < 1000
    kept = raw.update()["session"]["audio"]["input"]["transcription"]
    assert kept == {"model": "tiny", "language": "fr", "prompt": "p" * MAX_PROMPT_CHARS}
    transcribes(raw)
    raw.ws.close()


def test_logprobs_when_the_session_includes_them(server: RunningServer) -> None:
    """Each delta carries its tokens' log-probs, the completion all of them; they are the model's own."""
    raw = session(server)
    raw.send(**update(include=["item.input_audio_transcription.logprobs"], audio={"input": {"turn_detection": None}}))
    assert raw.until("session.updated")[-1]["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    raw.append(encode(sentence(), "audio/pcm"), 4800)
    raw.send(type="input_audio_buffer.commit")
    events = raw.until(COMPLETED)
    deltas = [e for e in events if e["type"].endswith(".delta")]
    completed = events[-1]
    joined = [p for d in deltas for p in d["logprobs"]]
    assert completed["logprobs"] == joined and joined, completed
    assert all(p["logprob"] <= 0 and isinstance(p["bytes"], list) for p in joined)
    assert b"".join(bytes(p["bytes"]) for p in joined).decode("utf-8", "replace").strip() == completed["transcript"]
    raw.ws.close()


def test_key_by_header_or_by_subprotocol(server: RunningServer) -> None:
    url = server.base_url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    for kwargs in ({}, {"subprotocols": ["realtime", "openai-insecure-api-key.sk-wrong"]}):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, **kwargs)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body or b"")["error"]["code"] == "invalid_api_key"
    raw = open_session(server.base_url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"])  # type: ignore[list-item]
    assert raw.ws.subprotocol == "realtime"  # the key itself is never echoed back
    raw.ws.close()


def test_unknown_model_is_refused_at_the_upgrade(server: RunningServer) -> None:
    url = server.base_url.replace("http://", "ws://") + "/v1/realtime?model=nope&intent=transcription"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers=AUTH)
    assert refused.value.response.status_code == 404
    assert json.loads(refused.value.response.body or b"")["error"]["code"] == "model_not_found"


def test_metrics_count_sessions_utterances_and_turn_latency(server: RunningServer) -> None:
    raw = session(server)
    raw.update(turn_detection=None)
    raw.append(encode(sentence(), "audio/pcm"), 4800)
    raw.send(type="input_audio_buffer.commit")
    raw.until(COMPLETED)
    with server.http() as http:
        lines = http.get("/metrics").text.splitlines()
    value = {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}
    assert value["voxtral_realtime_sessions"] >= 1
    assert value['voxtral_realtime_utterances_total{outcome="completed"}'] >= 1
    assert value["voxtral_realtime_turn_latency_seconds_count"] >= 1
    raw.ws.close()
