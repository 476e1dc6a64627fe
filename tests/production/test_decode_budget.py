"""Check before you decode: a request's audio limits are checked from the body and the files' headers before
any audio is decoded, and while decoding what declares no length stops at the budget (issue 32, point 2).

Through the real app over HTTP; spies count the unpacking (base64) and the decoding that a request caused, so
a test can say which parts were never touched. Time and memory are measured in bench/decode_budget.py.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from app import audio as audio_module
from app.audio_formats import InputDecoder
from app.model.compute.loader import LoadedModel
from app.serving import chat_audio, chat_request, prep
from tests.support.checks import assert_openai_error, wait_until
from tests.support.realtime_client import Raw, encode, open_session
from tests.support.server import RunningServer, serve

BUDGET_S = 20


def flac(seconds: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(16000 * seconds), np.float32), 16000, format="FLAC")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def input_audio(data: bytes) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": "flac"}}


def audio_url(data: bytes) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": "data:audio/flac;base64," + b64(data)}}


def chat(*contents: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": c} for c in contents]}


@dataclass
class Spy:
    unpacked: int = 0
    decoded: list[int] = field(default_factory=list)
    """Bytes of each file handed to the decoder."""
    blocks: int = 0
    """Blocks of samples decoded (any file)."""


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    seen = Spy()
    unpack, decode, add = chat_request.b64_audio, prep.decode_audio, audio_module._MonoCollector.add

    def unpacking(raw: str) -> bytes:
        seen.unpacked += 1
        return unpack(raw)

    def decoding(data: bytes, *args: Any) -> np.ndarray:
        seen.decoded.append(len(data))
        return decode(data, *args)

    def adding(self: Any, *args: Any) -> None:
        seen.blocks += 1
        add(self, *args)

    monkeypatch.setattr(chat_request, "b64_audio", unpacking)
    monkeypatch.setattr(prep, "decode_audio", decoding)
    monkeypatch.setattr(audio_module._MonoCollector, "add", adding)
    return seen


@pytest.fixture(scope="module")
def budget(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    limits = {"max_chat_audio_s": BUDGET_S, "max_transcription_audio_s": BUDGET_S, "max_audios_per_request": 4}
    with serve(loaded, tiny_dir, **limits) as running:
        yield running


@pytest.fixture(scope="module")
def bhttp(budget: RunningServer) -> Iterator[httpx.Client]:
    with budget.http() as client:
        yield client


def assert_still_serving(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat([input_audio(flac(1.0))]))
    assert response.status_code == 200, response.text


def test_nine_forty_minute_parts_are_refused_before_any_is_read(server: RunningServer, http: Any, spy: Spy) -> None:
    """The request of the issue: 9 parts of 40 minutes of FLAC silence (1.4 MB of JSON), default limits."""
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(**chat([input_audio(flac(2400))] * 9))
    error: Any = info.value.body
    assert error["param"] == "messages" and "9 audio parts" in error["message"] and "limit is 8" in error["message"]
    assert (spy.unpacked, spy.decoded) == (0, [])
    assert http.post("/v1/chat/completions", json=chat([{"type": "text", "text": "hi"}])).status_code == 200


def test_two_forty_minute_parts_are_refused_from_their_headers(http: httpx.Client, spy: Spy) -> None:
    """Each part is within the limit alone; together they pass it: refused at the second, nothing decoded."""
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat([input_audio(flac(2400))] * 2)), 400)
    assert error["code"] == "audio_too_long" and error["param"] == "messages[0].content[1].input_audio", error
    assert "4800.0 s" in error["message"] and "2400 s" in error["message"]
    assert (spy.unpacked, spy.decoded, spy.blocks) == (2, [], 0)


def test_the_part_that_passes_the_budget_is_named_and_none_after_it_is_read(bhttp: httpx.Client, spy: Spy) -> None:
    garbage = b"not audio at all" * 100  # decoding it would be a 400 invalid_audio
    body = chat(
        [{"type": "text", "text": "Compare."}, input_audio(flac(15))], [audio_url(flac(10)), input_audio(garbage)]
    )
    error = assert_openai_error(bhttp.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "audio_too_long" and error["param"] == "messages[1].content[0].audio_url", error
    assert f"limit is {BUDGET_S} s" in error["message"]
    assert (spy.unpacked, spy.decoded, spy.blocks) == (2, [], 0)  # the third part is never unpacked
    assert_still_serving(bhttp)


def test_parts_that_fill_the_budget_exactly_are_answered(bhttp: httpx.Client, spy: Spy) -> None:
    body = chat([input_audio(flac(BUDGET_S / 2)), {"type": "text", "text": "and"}, input_audio(flac(BUDGET_S / 2))])
    response = bhttp.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(spy.decoded) == 2


def test_audio_that_declares_no_length_stops_at_the_budget_while_decoding(
    bhttp: httpx.Client, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers that say nothing (or a backend that cannot read them): each part decodes with what the earlier
    parts left, and stops there; the parts after it are not decoded."""
    monkeypatch.setattr(chat_audio, "declared_seconds", lambda data, filename=None: None)
    body = chat([input_audio(flac(15)), input_audio(flac(15)), input_audio(b"not audio at all" * 100)])
    error = assert_openai_error(bhttp.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "audio_too_long" and error["param"] == "messages[0].content[1].input_audio", error
    assert f"limit of {BUDGET_S} s" in error["message"]
    assert len(spy.decoded) == 2
    assert_still_serving(bhttp)


def test_a_bad_part_is_named(bhttp: httpx.Client) -> None:
    body = chat([input_audio(flac(1)), {"type": "input_audio", "input_audio": {"data": "not base64!!"}}])
    error = assert_openai_error(bhttp.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "invalid_audio" and error["param"] == "messages[0].content[1].input_audio", error


def test_a_transcription_over_the_limit_is_refused_from_its_header(bhttp: httpx.Client, spy: Spy) -> None:
    files = {"file": ("long.flac", flac(40 * 60))}
    response = bhttp.post("/v1/audio/transcriptions", files=files, data={"model": "tiny"})
    error = assert_openai_error(response, 400)
    assert error["code"] == "audio_too_long" and error["param"] == "file", error
    assert "2400.0 s long" in error["message"] and f"limit is {BUDGET_S} s" in error["message"]
    assert spy.blocks == 0  # not one block of samples decoded
    assert_still_serving(bhttp)


# --- realtime appends ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def buffered(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, realtime_max_utterance_s=1.0, realtime_max_buffer_s=2.0) as running:
        yield running


@pytest.fixture
def pushed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of each append the sessions decoded."""
    seen: list[int] = []
    push = InputDecoder.push

    def pushing(self: InputDecoder, data: bytes) -> np.ndarray:
        seen.append(len(data))
        return push(self, data)

    monkeypatch.setattr(InputDecoder, "push", pushing)
    return seen


def pcm(seconds: float) -> str:
    return b64(encode(np.zeros(int(16000 * seconds), np.float32), "audio/pcm"))


def refused(raw: Raw, event_id: str) -> dict[str, Any]:
    error = raw.until("error")[-1]
    assert error["error"]["event_id"] == event_id, error
    return dict(error["error"])


def test_an_append_past_the_buffer_cap_is_refused_undecoded_and_the_session_goes_on(
    buffered: RunningServer, pushed: list[int]
) -> None:
    raw = open_session(buffered.base_url)
    raw.update(turn_detection=None)  # by hand: the buffer is committed at 1 s (realtime_max_utterance_s)
    raw.send(type="input_audio_buffer.append", audio=pcm(1.5), event_id="first")
    raw.until("input_audio_buffer.committed")  # 0.5 s stays in the buffer
    raw.send(type="input_audio_buffer.append", audio=pcm(1.6), event_id="big")
    error = refused(raw, "big")
    assert error["code"] == "audio_too_long" and error["param"] == "audio", error
    assert "1.6 s" in error["message"] and "at most 2 s" in error["message"], error
    assert len(pushed) == 1  # the refused append was never decoded
    raw.send(type="input_audio_buffer.append", audio=pcm(1.4), event_id="fits")
    raw.until("input_audio_buffer.committed")  # 0.5 + 1.4 s: within the cap, committed at 1 s
    assert len(pushed) == 2
    raw.ws.close()
    wait_until(lambda: buffered.context.realtime.slots.open == 0, "the session is closed")


def test_a_seventy_second_g711_append_fits_a_message_but_not_the_buffer(server: RunningServer) -> None:
    """Default limits: 70 s of G.711 is 750 KB of base64, under the 1 MB message limit, past the 60 s cap."""
    raw = open_session(server.base_url)
    raw.update(format={"type": "audio/pcmu"})
    raw.send(type="input_audio_buffer.append", audio=b64(bytes(70 * 8000)), event_id="long")
    error = refused(raw, "long")
    assert error["code"] == "audio_too_long" and "at most 60 s" in error["message"], error
    raw.send(type="input_audio_buffer.append", audio=b64(bytes(8000)), event_id="short")
    assert raw.update(turn_detection=None)["type"] == "session.updated"  # the session lives on
    assert len([e for e in raw.events if e["type"] == "error"]) == 1  # the short append was taken
    raw.ws.close()
    wait_until(lambda: server.context.realtime.slots.open == 0, "the session is closed")
