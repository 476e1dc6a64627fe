"""The faults of issue 32 beside a well-behaved session, through real sockets and HTTP against the real app
(point 7): while one session's utterances are being transcribed, idle connections past the cap get 503, a
nested-JSON event gets `invalid_json`, an over-long prompt gets `string_above_max_length`, a client that never
reads is closed with 1008 and a chat request of 9 x 40-minute parts gets a 400; every utterance of the
well-behaved session completes, none fails. (The commit flood beside another session: test_fair_sharing.py.)
Latency and memory under the same faults are measured in bench/faults.py."""

from __future__ import annotations

import base64
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from app.model.compute.loader import LoadedModel
from tests.support.checks import assert_openai_error, wait_until
from tests.support.production_server import Production, production
from tests.support.realtime_client import COMPLETED, Raw, encode, gap, never_reading, open_session, sentence

FAILED = "conversation.item.input_audio_transcription.failed"
MAX_CONNECTIONS = 8
PROMPT = {"audio": {"input": {"transcription": {"prompt": "p" * 4000}}}}


@pytest.fixture(scope="module")
def server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[Production]:
    with production(loaded, tiny_dir, max_connections=MAX_CONNECTIONS, realtime_max_pending_mb=0.1) as running:
        yield running


def ws_url(server: Production) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"


def commit_a_sentence(good: Raw) -> None:
    good.append(encode(np.concatenate([sentence(), gap(0.2)]), "audio/pcm"), 4800)
    good.send(type="input_audio_buffer.commit")


def completes(good: Raw) -> None:
    """The well-behaved session's utterance in flight completes with a transcript, nothing failed."""
    events = good.until(COMPLETED)
    assert not [e for e in events if e["type"] in (FAILED, "error")], events
    assert events[-1]["transcript"]


def silent_connections(server: Production, count: int) -> list[socket.socket]:
    """`count` connections that send nothing: held (until the head deadline), counted against the cap."""
    return [server.connect() for _ in range(count)]


def never_reads(server: Production) -> int | None:
    """A client that sends `session.update`s (each echoed whole) and reads nothing: the close code it got."""
    message = json.dumps({"type": "session.update", "session": {"type": "transcription", **PROMPT}}).encode()
    closed = never_reading(ws_url(server), message)
    return closed.code if closed is not None else None


def nine_forty_minute_parts() -> dict[str, Any]:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(16000 * 60 * 40, np.float32), 16000, format="FLAC")
    part = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(), "format": "flac"},
    }
    return {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [part] * 9}]}


def test_each_fault_beside_a_session_costs_it_nothing(server: Production) -> None:
    good, nested, strings = (open_session(server.base_url) for _ in range(3))
    good.update(turn_detection=None)

    commit_a_sentence(good)
    idle = silent_connections(server, 2 * MAX_CONNECTIONS)
    with server.http() as http:
        error = assert_openai_error(http.get("/health"), 503)  # a new request past the cap
        assert error["code"] == "too_many_connections"
    completes(good)  # a session already open goes on
    for sock in idle:
        sock.close()
    with server.http() as http:
        wait_until(lambda: http.get("/health").status_code == 200, "the idle connections' places are freed")

    commit_a_sentence(good)
    nested.ws.send("[" * 200_000)
    assert nested.until("error")[-1]["error"]["code"] == "invalid_json"
    update = {"type": "transcription", "audio": {"input": {"transcription": {"prompt": "p" * 900_000}}}}
    strings.send(type="session.update", session=update)
    assert strings.until("error")[-1]["error"]["code"] == "string_above_max_length"
    completes(good)

    commit_a_sentence(good)
    assert never_reads(server) == 1008
    with server.http() as http:
        error = assert_openai_error(http.post("/v1/chat/completions", json=nine_forty_minute_parts()), 400)
    assert error["param"] == "messages"
    completes(good)

    for raw in (good, nested, strings):
        raw.ws.close()
    wait_until(lambda: server.context.realtime.slots.open == 0, "the sessions are closed")
