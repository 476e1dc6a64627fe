"""Raw bodies and every SSE event the server sends, held against OpenAI's published schemas.

Raw, not through the SDK: the SDK parses leniently (a null where the spec says string passes), so
only the bytes on the wire show what a strict client would meet. Needs the spec (tests/support/openapi_spec.py).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from tests.support.audio_fixtures import clip_bytes
from tests.support.openapi_spec import check, load_spec
from tests.support.server import AUDIO
from tests.support.tool_fixtures import NAMED, TOOLS

JFK = (AUDIO / "jfk.wav").read_bytes()
FR = (AUDIO / "speech_fr.wav").read_bytes()
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": base64.b64encode(JFK).decode(), "format": "wav"}}
CHATS = {
    "text": {"messages": [{"role": "user", "content": "Hi"}]},
    "audio": {"messages": [{"role": "user", "content": [AUDIO_PART, {"type": "text", "text": "What is said?"}]}]},
    "tools-auto": {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS},
    "tool-call": {
        "messages": [{"role": "user", "content": "Time?"}],
        "tools": TOOLS,
        "tool_choice": NAMED,
        "max_tokens": 200,
    },
    "json-schema": {
        "messages": [{"role": "user", "content": "A city."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": TOOLS[0]["function"]["parameters"]},
        },
        "max_tokens": 40,  # below the shortest valid object (17 tokens) is a 400
    },
    "logprobs-n": {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 3, "n": 2},
    "tool-call-logprobs": {
        "messages": [{"role": "user", "content": "Time?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 60,
        "logprobs": True,
    },
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec()


def events(response: httpx.Response) -> list[Any]:
    """Every `data:` payload of an SSE body, parsed; `[DONE]` stays a string."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in blocks]


def chat(http: httpx.Client, body: dict[str, Any], **extra: Any) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"model": "tiny", "max_tokens": 12, "temperature": 0, **body, **extra}
    )


def upload(http: httpx.Client, path: str, data: bytes, name: str = "a.wav", **form: Any) -> httpx.Response:
    return http.post(f"/v1/audio/{path}", files={"file": (name, data)}, data={"model": "tiny", **form})


# -- chat ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CHATS))
def test_chat_answer(http: httpx.Client, spec: dict[str, Any], case: str) -> None:
    r = chat(http, CHATS[case])
    assert r.status_code == 200, r.text
    check(spec, "CreateChatCompletionResponse", r.json())
    if case == "tool-call":
        assert r.json()["choices"][0]["message"]["tool_calls"]


@pytest.mark.parametrize("usage", [False, True], ids=["plain", "with-usage"])
@pytest.mark.parametrize("case", list(CHATS))
def test_every_chat_chunk(http: httpx.Client, spec: dict[str, Any], case: str, usage: bool) -> None:
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    *chunks, done = events(chat(http, CHATS[case], stream=True, **extra))
    assert done == "[DONE]" and len(chunks) >= 2
    for chunk in chunks:
        check(spec, "CreateChatCompletionStreamResponse", chunk)
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    if case == "tool-call":
        assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)


# -- transcription and translation -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "clip", "fmt", "schema"),
    [
        ("transcriptions", "jfk.wav", "json", "CreateTranscriptionResponseJson"),
        ("transcriptions", "jfk.wav", "verbose_json", "CreateTranscriptionResponseVerboseJson"),
        ("transcriptions", "silence_5s.wav", "verbose_json", "CreateTranscriptionResponseVerboseJson"),
        ("translations", "speech_fr.wav", "json", "CreateTranslationResponseJson"),
        ("translations", "speech_fr.wav", "verbose_json", "CreateTranslationResponseVerboseJson"),
    ],
)
def test_audio_answer(http: httpx.Client, spec: dict[str, Any], path: str, clip: str, fmt: str, schema: str) -> None:
    r = upload(http, path, clip_bytes(clip), response_format=fmt)
    assert r.status_code == 200, r.text
    check(spec, schema, r.json())


@pytest.mark.parametrize("path", ["transcriptions", "translations"])
def test_every_audio_stream_event(http: httpx.Client, spec: dict[str, Any], path: str) -> None:
    *deltas, done = events(upload(http, path, JFK, stream="true"))
    assert deltas, "no delta before the done event"
    for event in deltas:
        check(spec, "TranscriptTextDeltaEvent", event)
    check(spec, "TranscriptTextDoneEvent", done)


# -- models and errors -----------------------------------------------------------------------------
def test_models(http: httpx.Client, spec: dict[str, Any]) -> None:
    listed = http.get("/v1/models")
    assert listed.status_code == 200
    check(spec, "ListModelsResponse", listed.json())
    one = http.get(f"/v1/models/{listed.json()['data'][0]['id']}")
    assert one.status_code == 200
    check(spec, "Model", one.json())


ERRORS = {
    "chat-no-messages": lambda h: h.post("/v1/chat/completions", json={"model": "tiny"}),
    "chat-not-json": lambda h: h.post(
        "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
    ),
    "chat-unknown-model": lambda h: chat(h, CHATS["text"], model="gpt-nothing"),
    "chat-bad-tool-choice": lambda h: chat(
        h, CHATS["text"], tool_choice={"type": "function", "function": {"name": "x"}}
    ),
    "audio-not-audio": lambda h: upload(h, "transcriptions", b"plainly not audio" * 100),
    "audio-stream-srt": lambda h: upload(h, "transcriptions", JFK, stream="true", response_format="srt"),
    "translation-no-file": lambda h: h.post("/v1/audio/translations", data={"model": "tiny"}),
    "unknown-model-get": lambda h: h.get("/v1/models/gpt-nothing"),
    "unknown-route": lambda h: h.get("/v1/nothing-here"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_body(http: httpx.Client, spec: dict[str, Any], case: str) -> None:
    r = ERRORS[case](http)
    assert 400 <= r.status_code < 500, r.text
    check(spec, "ErrorResponse", r.json())


def test_nullable_is_read_as_or_null(spec: dict[str, Any]) -> None:
    """The spec's `nullable: true` (logprobs of a chunk's choice) must accept null, and still refuse a string."""
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": None, "logprobs": None}],
    }
    check(spec, "CreateChatCompletionStreamResponse", chunk)
    chunk["choices"][0]["logprobs"] = "none"
    with pytest.raises(Exception, match=r"is not valid under any of the given schemas|is not of type"):
        check(spec, "CreateChatCompletionStreamResponse", chunk)
