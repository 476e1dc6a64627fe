"""Voxtral Realtime sessions sharing one ticking loop, through the real app and the `openai` SDK: sessions that
join and leave at different times (one drops its socket mid-utterance) each get the model layer's own text, ticks
step several of them at once, the tick metrics add up to the tokens decoded, the loop's limits (stream slots,
session length, idle time) answer with OpenAI's events and close codes, and the blank-token rut is counted."""

from __future__ import annotations

import base64
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.audio_formats import InputDecoder
from app.model.compute.loader import LoadedModel
from app.model.realtime.engine import RealtimeEngine, StreamStep
from app.serving.realtime.streamer import blank_run
from tests.support.checks import wait_until
from tests.support.realtime_client import (
    COMPLETED,
    DELTA,
    chunk_bytes,
    encode,
    gap,
    open_session,
    sentence,
    texts,
)
from tests.support.realtime_reference import synthetic
from tests.support.server import RunningServer, serve

MODEL = "tiny-realtime"
CHUNK = chunk_bytes("audio/pcm")
BLANK_S = 0.44
"""The module server's --realtime-blank-speech-s: between 5 and 6 frames (0.40 and 0.48 s), the longest runs of
speech audio without text the tiny model has over the test sentence's VAD turn at 240 ms and at DELAY_FIRES."""
DELAY_FIRES = 1680
"""A delay at which the tiny model's steps over the test sentence hold such a run (the test checks it)."""
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


@pytest.fixture(scope="module")
def server(realtime_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    dir_ = tmp_path_factory.mktemp("rt-loop")
    with serve(realtime_model, dir_, model=MODEL, realtime_blank_speech_s=BLANK_S) as running:
        yield running


def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def connect(stack: contextlib.ExitStack, server: RunningServer, vad: dict[str, Any] | None = None, **tr: Any) -> Any:
    """An SDK session configured (24 kHz PCM, `vad`, transcription settings `tr`) and acknowledged."""
    connection = stack.enter_context(sdk(server).realtime.connect(model=MODEL, extra_query={"intent": "transcription"}))
    assert connection.recv().type == "session.created"
    audio_input: dict[str, Any] = {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": vad}
    if tr:
        audio_input["transcription"] = {"model": MODEL} | tr
    session: Any = {"type": "transcription", "audio": {"input": audio_input}}
    connection.session.update(session=session)
    assert connection.recv().type == "session.updated"
    return connection


def append(connection: Any, data: bytes) -> None:
    for at in range(0, len(data), CHUNK):
        connection.input_audio_buffer.append(audio=base64.b64encode(data[at : at + CHUNK]).decode())


def interleaved(*sends: tuple[Any, bytes]) -> None:
    """Send each connection's audio chunk by chunk, taking turns: the server gets them at about the same time."""
    for at in range(0, max(len(data) for _, data in sends), CHUNK):
        for connection, data in sends:
            if at < len(data):
                connection.input_audio_buffer.append(audio=base64.b64encode(data[at : at + CHUNK]).decode())


def until(connection: Any, kind: str, count: int = 1) -> list[Any]:
    """Events up to the `count`th of type `kind`; an `error` on the way fails the test."""
    events: list[Any] = []
    while sum(e.type == kind for e in events) < count:
        events.append(connection.recv())
        assert events[-1].type != "error", events[-1]
    return events


def answered(events: list[Any]) -> list[tuple[str, str]]:
    """(the deltas joined, the `.completed` transcript) of each completed item."""
    return [
        ("".join(d.delta for d in events if d.type == DELTA and d.item_id == e.item_id), e.transcript)
        for e in events
        if e.type == COMPLETED
    ]


def engine_steps(loaded: LoadedModel, data: bytes, delay: str | int | None = None) -> list[StreamStep]:
    """The model layer alone over what a manual-commit session decodes from `data` sent in CHUNK appends."""
    decoder = InputDecoder("audio/pcm")
    samples = [decoder.push(data[at : at + CHUNK]) for at in range(0, len(data), CHUNK)] + [decoder.flush()]
    engine = RealtimeEngine(loaded.model, loaded.processor, max_streams=1)
    sid = engine.open(delay)
    engine.feed(sid, np.concatenate(samples))
    engine.flush(sid)
    steps: list[StreamStep] = []
    while not (steps and steps[-1].final):
        steps += engine.tick().steps
    return steps


def metrics(server: RunningServer) -> dict[str, float]:
    with server.http() as http:
        lines = http.get("/metrics").text.splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def quiet(server: RunningServer) -> dict[str, float]:
    """The metrics once every stream has closed."""
    wait_until(lambda: metrics(server)["voxtral_realtime_streams"] == 0, "every stream is closed", poll_s=0.05)
    return metrics(server)


def test_sessions_joining_and_leaving_share_ticks_and_each_gets_its_own_text(
    server: RunningServer, realtime_model: LoadedModel
) -> None:
    """A streams alone, B joins, C joins and drops its socket mid-utterance, D joins after C left: A, B and D each
    get exactly the model layer's text for their own audio, and ticks stepped more than one stream at once."""
    a, b, c, d = (
        encode(audio, "audio/pcm")
        for audio in (np.tile(sentence(), 2), synthetic(3.0, 1), sentence(), synthetic(2.5, 2))
    )
    third = len(a) // 3 // CHUNK * CHUNK
    before = quiet(server)
    with contextlib.ExitStack() as stack:
        session_a = connect(stack, server)
        append(session_a, a[:third])
        session_b, session_c = connect(stack, server), open_session(server.base_url)
        session_c.update(turn_detection=None)
        interleaved((session_a, a[third : 2 * third]), (session_b, b[: len(b) // 2 // CHUNK * CHUNK]))
        session_c.append(c[: len(c) // 2], CHUNK)
        session_c.until(DELTA)  # C's utterance is being decoded
        session_c.ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a close frame
        session_c.ws.socket.close()
        session_d = connect(stack, server)
        interleaved((session_a, a[2 * third :]), (session_b, b[len(b) // 2 // CHUNK * CHUNK :]), (session_d, d))
        for connection in (session_a, session_b, session_d):
            connection.input_audio_buffer.commit()
        results = [answered(until(connection, COMPLETED)) for connection in (session_a, session_b, session_d)]
    for data, result in zip((a, b, d), results, strict=True):
        expected = "".join(step.text for step in engine_steps(realtime_model, data))
        assert result == [(expected, expected)] and expected
    after = quiet(server)
    assert after["voxtral_realtime_streams"] == 0
    rows = "voxtral_realtime_tick_rows"
    ticks = after[f"{rows}_count"] - before[f"{rows}_count"]
    single = after[f'{rows}_bucket{{le="1.0"}}'] - before[f'{rows}_bucket{{le="1.0"}}']
    assert ticks > single, "no tick stepped two streams at once"


def test_tick_metrics_add_up_to_the_tokens_decoded(server: RunningServer, realtime_model: LoadedModel) -> None:
    """Two sessions at once: the ticks' rows sum to the tokens the model layer gives for their audio, the deltas
    are those tokens with text, and the live-stream gauge is back to 0 once they are answered."""
    audio = [encode(sentence(), "audio/pcm"), encode(synthetic(2.0, 3), "audio/pcm")]
    before = quiet(server)
    with contextlib.ExitStack() as stack:
        connections = [connect(stack, server), connect(stack, server, delay="low")]
        interleaved(*zip(connections, audio, strict=True))
        for connection in connections:
            connection.input_audio_buffer.commit()
        events = [until(connection, COMPLETED) for connection in connections]
    steps = [engine_steps(realtime_model, audio[0]), engine_steps(realtime_model, audio[1], "low")]
    for got, expected in zip(events, steps, strict=True):
        assert sum(e.type == DELTA for e in got) == sum(bool(step.text) for step in expected)
    after = quiet(server)

    def grew(name: str) -> float:
        return after[name] - before[name]

    tokens = sum(len(s) for s in steps)
    assert grew("voxtral_realtime_tick_rows_sum") == tokens
    assert max(len(s) for s in steps) <= grew("voxtral_realtime_tick_rows_count") <= tokens
    ticks = grew("voxtral_realtime_tick_rows_count")
    assert grew("voxtral_realtime_tick_seconds_count") == grew("voxtral_realtime_tick_real_time_factor_count") == ticks
    assert grew("voxtral_realtime_tick_seconds_sum") > 0
    assert after["voxtral_realtime_streams"] == 0


def session_samples(data: bytes) -> np.ndarray:
    """The session's 16 kHz timeline of `data` sent in CHUNK appends (what its streams are fed slices of)."""
    decoder = InputDecoder("audio/pcm")
    return np.concatenate([decoder.push(data[at : at + CHUNK]) for at in range(0, len(data), CHUNK)])


def stream_steps(loaded: LoadedModel, samples: np.ndarray, delay: str | int | None) -> list[StreamStep]:
    """The model layer alone over one utterance's audio, flushed."""
    engine = RealtimeEngine(loaded.model, loaded.processor, max_streams=1)
    sid = engine.open(delay)
    engine.feed(sid, samples)
    engine.flush(sid)
    steps: list[StreamStep] = []
    while not (steps and steps[-1].final):
        steps += engine.tick().steps
    return steps


def longest_blank_s(steps: list[StreamStep], delay_ms: int, samples: int) -> float:
    """The longest run of speech audio without text in `steps` (app/serving/realtime/streamer.py: `blank_run`)."""
    longest, last = 0, None
    for step in steps:
        if step.text.strip():
            last = step.frame
        else:
            longest = max(longest, blank_run(step.frame, delay_ms // 80, samples // 1280, last))
    return longest * 0.08


@pytest.mark.parametrize(("delay_ms", "fires"), [(DELAY_FIRES, True), (240, False)])
def test_the_blank_token_rut_is_counted_only_when_speech_gets_no_text(
    server: RunningServer, realtime_model: LoadedModel, delay_ms: int, fires: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Speech VAD hears is streamed from speech_started (its prefix padding included) to speech_stopped: the
    model layer's own steps over that audio have, at DELAY_FIRES, a run of speech audio without text of at least
    BLANK_S (counted and logged once), at 240 ms none (not counted); the model's delay and the flush's padding
    speak for no audio, and are never counted."""
    before = quiet(server)
    data = encode(np.concatenate([gap(0.5), sentence(), gap(1.5)]), "audio/pcm")
    with contextlib.ExitStack() as stack:
        connection = connect(stack, server, VAD, delay_ms=delay_ms)
        append(connection, data)
        events = until(connection, COMPLETED)
    (started,) = [e.audio_start_ms for e in events if e.type == "input_audio_buffer.speech_started"]
    (stopped,) = [e.audio_end_ms for e in events if e.type == "input_audio_buffer.speech_stopped"]
    heard = session_samples(data)[started * 16 : stopped * 16]
    steps = stream_steps(realtime_model, heard, delay_ms)
    assert "".join(step.text for step in steps) == answered(events)[0][1]  # the stream the session decoded
    assert (longest_blank_s(steps, delay_ms, heard.shape[0]) >= BLANK_S) == fires
    grew = quiet(server)["voxtral_realtime_blank_streams_total"] - before["voxtral_realtime_blank_streams_total"]
    assert grew == (1 if fires else 0)
    assert ("blank-token rut" in caplog.text) == fires


def test_semantic_vad_ends_a_streamed_turn(server: RunningServer) -> None:
    """With semantic_vad the turn-end model ends each turn of a streaming session: deltas, then `.completed`."""
    speech = sentence()
    with contextlib.ExitStack() as stack:
        connection = connect(stack, server, {"type": "semantic_vad", "eagerness": "high"})
        append(connection, encode(np.concatenate([gap(0.5), speech, gap(3.0), speech, gap(3.0)]), "audio/pcm"))
        events = until(connection, COMPLETED, 2)
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.speech_stopped") == kinds.count("input_audio_buffer.committed") == 2
    assert kinds.index(DELTA) < kinds.index("input_audio_buffer.speech_stopped")  # text while still talking
    completed = answered(events)
    assert len(completed) == 2 and all(deltas == transcript and transcript for deltas, transcript in completed)


def test_models_and_ready_name_the_realtime_model(server: RunningServer) -> None:
    assert [model.id for model in sdk(server).models.list()] == [MODEL]
    with server.http() as http:
        assert http.get("/ready").status_code == 200


def test_the_session_length_limit_answers_what_was_committed_then_closes_as_openai_does(
    realtime_model: LoadedModel, tmp_path: Path
) -> None:
    """At --realtime-max-session-s: an `error` (session_expired), every committed utterance answered (the one
    in progress committed first), then the close OpenAI sends at its 60-minute limit: 1001 with the message."""
    with serve(realtime_model, tmp_path, model=MODEL, realtime_max_session_s=2.0) as running:
        raw = open_session(running.base_url)
        raw.update(turn_detection=None)
        raw.append(encode(sentence(), "audio/pcm"), CHUNK)
        raw.send(type="input_audio_buffer.commit")
        speaking = encode(synthetic(4.0, 4), "audio/pcm")
        with contextlib.suppress(ConnectionClosed):
            for at in range(0, len(speaking), CHUNK):  # the client still talks when the limit comes
                raw.append(speaking[at : at + CHUNK], CHUNK)
                time.sleep(0.1)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                raw.recv()
    errors = [e for e in raw.events if e["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["session_expired"], errors
    assert errors[0]["error"]["type"] == "invalid_request_error"
    committed = [e["item_id"] for e in raw.events if e["type"] == "input_audio_buffer.committed"]
    assert len(committed) == 2 and [item for item, _, _ in texts(raw.events)] == committed
    assert all(deltas == transcript for _, deltas, transcript in texts(raw.events))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert "maximum duration" in closed.value.rcvd.reason


def test_an_idle_streaming_session_is_closed_after_its_utterance_is_answered(
    realtime_model: LoadedModel, tmp_path: Path
) -> None:
    """A client silent mid-utterance is idle (the utterance being fed is not one waiting for its answer): an
    `error` (idle_timeout), the utterance committed and answered, then close 1000."""
    with serve(realtime_model, tmp_path, model=MODEL, realtime_idle_timeout_s=0.5) as running:
        raw = open_session(running.base_url)
        raw.update(turn_detection=None)
        raw.append(encode(sentence(), "audio/pcm"), CHUNK)  # no commit: the client falls silent mid-utterance
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                raw.recv(timeout=15)  # (a session never idle would time this out)
    assert [e["error"]["code"] for e in raw.events if e["type"] == "error"] == ["idle_timeout"]
    assert len(list(texts(raw.events))) == 1
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_every_stream_taken_refuses_a_session_and_an_http_transcription(
    realtime_model: LoadedModel, tmp_path: Path
) -> None:
    """--realtime-max-streams 1 with one utterance streaming: a second session is refused at the upgrade (429
    too_many_sessions: sessions are capped at the streams, so none is admitted only to have its utterances
    refused), a transcription gets a 429 in OpenAI's error shape; both go through once the stream is free."""
    path = tmp_path / "speech.wav"
    sf.write(path, sentence(), 16000)
    with (
        serve(realtime_model, tmp_path, model=MODEL, realtime_max_streams=1) as running,
        contextlib.ExitStack() as stack,
    ):
        holder = connect(stack, running)
        append(holder, encode(sentence(), "audio/pcm"))  # its stream stays open until the commit
        with pytest.raises(InvalidStatus) as upgrade:
            open_session(running.base_url)
        assert upgrade.value.response.status_code == 429
        assert b"too_many_sessions" in upgrade.value.response.body
        with path.open("rb") as f, pytest.raises(openai.RateLimitError) as http:
            sdk(running).audio.transcriptions.create(model=MODEL, file=f)
        body = http.value.response.json()
        assert http.value.status_code == 429 and set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "rate_limit_exceeded"
        holder.input_audio_buffer.commit()
        until(holder, COMPLETED)
        holder.close()
        quiet(running)  # the holder's stream is closed
        with path.open("rb") as f:
            assert sdk(running).audio.transcriptions.create(model=MODEL, file=f).text
        wait_until(lambda: metrics(running)["voxtral_realtime_sessions"] == 0, "the holder left", poll_s=0.05)
        second = connect(stack, running, VAD)
        append(second, encode(np.concatenate([gap(0.5), sentence(), gap(1.5)]), "audio/pcm"))
        events = until(second, COMPLETED)
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == kinds.count("input_audio_buffer.committed") == 1
    assert all(deltas == transcript and transcript for deltas, transcript in answered(events))
