"""Transcription log-probs: include[]=logprobs with json (CreateTranscriptionResponseJson.logprobs) and in the
stream's delta and done events, through the openai SDK and held to OpenAI's schemas; verbose_json segments'
avg_logprob is the mean log-prob of their tokens."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.checks import assert_openai_error
from tests.support.openapi_spec import check, load_spec
from tests.support.server import AUDIO


def jfk() -> bytes:
    return (AUDIO / "jfk.wav").read_bytes()


def test_json_with_logprobs_lists_the_text_tokens(client: Any, http: httpx.Client) -> None:
    r = client.audio.transcriptions.create(model="tiny", file=("a.wav", jfk()), include=["logprobs"], language="en")
    assert r.logprobs and all(e.logprob <= 0 for e in r.logprobs)
    joined = b"".join(bytes(int(b) for b in e.bytes) for e in r.logprobs).decode("utf-8", errors="replace")
    assert joined.strip() == r.text  # the text's tokens, no lang:xx prefix, no control token
    raw = http.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", jfk())}, data={"model": "tiny", "include[]": "logprobs"}
    )
    assert raw.status_code == 200, raw.text
    check(load_spec(), "CreateTranscriptionResponseJson", raw.json())
    assert "logprobs" not in client.audio.transcriptions.create(model="tiny", file=("a.wav", jfk())).model_dump(
        exclude_none=True
    )


def test_streamed_logprobs_join_to_the_done_events_and_the_json(client: Any, http: httpx.Client) -> None:
    whole = client.audio.transcriptions.create(model="tiny", file=("a.wav", jfk()), include=["logprobs"])
    events = list(
        client.audio.transcriptions.create(model="tiny", file=("a.wav", jfk()), include=["logprobs"], stream=True)
    )
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    streamed = [(x.token, x.logprob) for d in deltas for x in d.logprobs or []]
    assert streamed == [(x.token, x.logprob) for x in done.logprobs] == [(x.token, x.logprob) for x in whole.logprobs]
    spec = load_spec()
    body = {"model": "tiny", "include[]": "logprobs", "stream": "true"}
    with http.stream("POST", "/v1/audio/transcriptions", files={"file": ("a.wav", jfk())}, data=body) as response:
        lines = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    for line in lines:
        name = "TranscriptTextDeltaEvent" if line["type"] == "transcript.text.delta" else "TranscriptTextDoneEvent"
        check(spec, name, line)


def test_verbose_json_segments_average_their_tokens_logprobs(http: httpx.Client) -> None:
    data = {"model": "tiny", "response_format": "verbose_json"}
    r = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", jfk())}, data=data)
    assert r.status_code == 200, r.text
    segments = r.json()["segments"]
    assert segments and all(s["avg_logprob"] < 0 for s in segments)
    check(load_spec(), "CreateTranscriptionResponseVerboseJson", r.json())


def test_logprobs_with_another_format_is_a_400(http: httpx.Client) -> None:
    data = {"model": "tiny", "response_format": "text", "include[]": "logprobs"}
    error = assert_openai_error(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", jfk())}, data=data), 400)
    assert error["param"] == "include"
