"""A stream that fails after its response started: OpenAI's error event, logged, and (chat) `[DONE]`.

The failure is injected by wrapping the serving layer's real delta generator so that it raises after
its first delta; the model, queue and HTTP path are the real ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest

import app.serving.chat as serving_chat
from app.serving.transcription import TranscriptionRun
from tests.support.server import AUDIO, RunningServer

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}


def failing_after_first(source: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(*args: Any) -> AsyncIterator[Any]:
        async for delta in source(*args):
            yield delta
            raise RuntimeError("injected failure")

    return wrapped


def events(body: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_chat_stream_sends_an_error_event_then_done_on_an_unexpected_exception(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serving_chat, "chat_deltas", failing_after_first(serving_chat.chat_deltas))
    with caplog.at_level(logging.ERROR, logger="app.api.chat_events"), server.http() as http:
        response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    sent = events(response.text)
    assert sent[0]["object"] == "chat.completion.chunk" and sent[0]["choices"][0]["delta"]["role"] == "assistant"
    error = sent[1]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "injected" not in error["message"]  # no internals leave the server
    assert sent[2:] == ["[DONE]"]
    assert any("chat stream failed" in r.message for r in caplog.records)


def test_the_sdk_raises_the_chat_stream_error(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_chat, "chat_deltas", failing_after_first(serving_chat.chat_deltas))
    stream = server.client().chat.completions.create(**CHAT)
    with pytest.raises(openai.APIError):
        list(stream)


def test_transcription_stream_sends_an_error_event_on_an_unexpected_exception(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TranscriptionRun, "deltas", failing_after_first(TranscriptionRun.deltas))
    with open(AUDIO / "jfk.wav", "rb") as f, server.http() as http:
        files, data = {"file": ("jfk.wav", f)}, {"model": "tiny", "stream": "true"}
        response = http.post("/v1/audio/transcriptions", files=files, data=data)
    assert response.status_code == 200
    sent = events(response.text)
    assert sent[-1]["error"]["type"] == "server_error", sent
    assert all(e.get("type") == "transcript.text.delta" for e in sent[:-1])
    # Then the server keeps serving.
    with open(AUDIO / "jfk.wav", "rb") as f:
        assert server.client().audio.transcriptions.create(model="tiny", file=f).text is not None
