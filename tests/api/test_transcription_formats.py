"""Every response format, option and the stream of /v1/audio/transcriptions and /translations,
through the openai SDK (raw bodies are held against OpenAI's schemas in test_openapi_conformance)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.api.transcripts import RENDERERS, cue_text, timestamp
from app.serving.transcription_request import FORMATS, STREAM_FORMATS, TIMED_FORMATS
from tests.support.audio_fixtures import clip_bytes
from tests.support.checks import assert_openai_error
from tests.support.server import AUDIO

JFK = AUDIO / "jfk.wav"
SRT_TIME = r"\d\d:\d\d:\d\d,\d\d\d"
VTT_TIME = r"\d\d:\d\d:\d\d\.\d\d\d"


def test_every_accepted_format_has_a_renderer() -> None:
    """The serving layer validates response_format, app/api renders it: the two lists must agree."""
    assert tuple(RENDERERS) == FORMATS
    assert set(FORMATS) == STREAM_FORMATS | TIMED_FORMATS


def post(http: httpx.Client, path: str = "transcriptions", name: Path = JFK, **data: Any) -> httpx.Response:
    with name.open("rb") as f:
        return http.post(f"/v1/audio/{path}", files={"file": (name.name, f)}, data={"model": "tiny", **data})


def transcribe(client: Any, name: Path = JFK, **kwargs: Any) -> Any:
    with name.open("rb") as f:
        return client.audio.transcriptions.create(model="tiny", file=f, **kwargs)


# -- formats ---------------------------------------------------------------------------------------
def test_json_body(http: httpx.Client, client: Any) -> None:
    r = post(http, response_format="json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    result = transcribe(client, response_format="json")
    assert result.text == r.json()["text"] and result.usage.type == "tokens"


def test_json_languages_and_verbose_json_language(client: Any) -> None:
    asked = transcribe(client, language="fr")
    assert asked.to_dict()["languages"] == [{"code": "fr"}]
    assert transcribe(client, language="fr", response_format="verbose_json").language == "french"
    # The random tiny model announces no language: none is detected, so none is named.
    assert "languages" not in transcribe(client).to_dict()


def test_text_is_plain_text_with_a_newline(client: Any) -> None:
    text = transcribe(client, response_format="text")
    assert isinstance(text, str) and text.endswith("\n") and text.strip() == transcribe(client).text


def test_verbose_json_has_real_times(http: httpx.Client, client: Any) -> None:
    body = post(http, response_format="verbose_json", language="en").json()
    assert body["task"] == "transcribe" and body["language"] == "english"
    assert body["duration"] == pytest.approx(11.0, abs=0.01)
    assert body["usage"] == {"type": "duration", "seconds": body["duration"]}
    (segment,) = body["segments"]  # 11 s of speech with pauses under a second: one piece, around the voice
    assert segment["id"] == 0 and segment["seek"] == round(segment["start"] * 100) and segment["start"] < 0.5
    assert segment["end"] == pytest.approx(11.0, abs=0.5) and segment["text"] == body["text"]
    assert segment["temperature"] == 0.0 and segment["tokens"] and segment["compression_ratio"] > 0
    verbose = transcribe(client, response_format="verbose_json", language="en")
    assert verbose.text == body["text"] and verbose.segments[0].end == segment["end"]


def test_srt_and_vtt_cues_carry_the_segment_times(http: httpx.Client, client: Any) -> None:
    segments = post(http, response_format="verbose_json").json()["segments"]
    srt = transcribe(client, response_format="srt")
    assert re.fullmatch(rf"(\d+\n{SRT_TIME} --> {SRT_TIME}\n([^\n]+\n)+\n?)+", srt), srt
    times = [timestamp(segments[0][edge], ",") for edge in ("start", "end")]
    assert srt.startswith(f"1\n{times[0]} --> {times[1]}\n") and cue_text(segments[0]["text"]) in srt
    vtt = transcribe(client, response_format="vtt")
    assert re.fullmatch(rf"WEBVTT\n\n({VTT_TIME} --> {VTT_TIME}\n([^\n]+\n)+\n?)+", vtt), vtt
    times = [timestamp(segments[0][edge], ".") for edge in ("start", "end")]
    assert f"{times[0]} --> {times[1]}\n" + cue_text(segments[0]["text"]) in vtt


def test_every_format_gives_the_same_text(http: httpx.Client) -> None:
    texts = {fmt: post(http, response_format=fmt) for fmt in ("json", "text", "verbose_json", "srt", "vtt")}
    text = texts["json"].json()["text"]
    assert texts["text"].text == text + "\n" and texts["verbose_json"].json()["text"] == text
    assert cue_text(text) in texts["srt"].text and cue_text(text) in texts["vtt"].text
    assert texts["vtt"].headers["content-type"].startswith("text/vtt")


def test_silence_has_no_segments(http: httpx.Client, tmp_path: Path) -> None:
    silence = tmp_path / "silence_5s.wav"
    silence.write_bytes(clip_bytes("silence_5s.wav"))
    body = post(http, name=silence, response_format="verbose_json").json()
    assert body["segments"] == [] and body["text"] == "" and body["duration"] == pytest.approx(5.0)
    assert post(http, name=silence, response_format="srt").text == ""


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_unknown_response_format_lists_the_known_ones(http: httpx.Client, fmt: str) -> None:
    error = assert_openai_error(post(http, response_format="diarized_json"), 400)
    assert error["param"] == "response_format" and fmt in error["message"]


# -- options ---------------------------------------------------------------------------------------
def test_word_timestamps_are_refused_segment_ones_served(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(client, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert "word timestamps are not supported" in info.value.message.lower()
    assert info.value.body["param"] == "timestamp_granularities"  # type: ignore[index]
    verbose = transcribe(client, response_format="verbose_json", timestamp_granularities=["segment"])
    assert verbose.segments and not verbose.words


def test_unsupported_language_lists_the_supported_ones(client: Any) -> None:
    for code in ("xx", "ja", "english"):
        with pytest.raises(openai.BadRequestError) as info:
            transcribe(client, language=code)
        assert "en, es, fr, pt, hi, de, nl, it" in info.value.message
        assert info.value.body["param"] == "language"  # type: ignore[index]


def test_language_code_is_case_insensitive(client: Any) -> None:
    assert transcribe(client, language="FR").text == transcribe(client, language="fr").text
    verbose = transcribe(client, language="de", response_format="verbose_json")
    assert verbose.language == "german"


def test_without_language_the_model_detects_it(client: Any) -> None:
    verbose = transcribe(client, response_format="verbose_json")
    # The random tiny model announces no language: reported as unknown, never as a guess.
    assert verbose.language in {"unknown", "english"} and not verbose.text.startswith("lang:")


def test_prompt_is_ignored_for_transcription(http: httpx.Client) -> None:
    plain = post(http).json()
    prompted = post(http, prompt="Kennedy's inaugural address, 1961.").json()
    assert prompted == plain


def test_temperature(client: Any, http: httpx.Client) -> None:
    assert transcribe(client, temperature=0.0).text == transcribe(client).text
    assert isinstance(transcribe(client, temperature=1.0).text, str)
    assert assert_openai_error(post(http, temperature="1.5"), 400)["param"] == "temperature"


def test_logprobs_outside_json_are_refused(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(client, include=["logprobs"], response_format="verbose_json")
    assert info.value.body["param"] == "include"  # type: ignore[index]


@pytest.mark.parametrize(
    "strategy",
    ['{"type": "server_vad", "threshold": 2}', '{"type": "vad"}', '{"type": "server_vad", "x": 1}', "{oops", "7"],
)
def test_bad_chunking_strategy_is_400(http: httpx.Client, strategy: str) -> None:
    error = assert_openai_error(post(http, chunking_strategy=strategy), 400)
    assert error["param"] == "chunking_strategy"


def test_chunking_strategy_as_json_sdk_object_or_auto(http: httpx.Client, client: Any) -> None:
    vad = {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 300, "prefix_padding_ms": 200}
    as_sdk = transcribe(client, chunking_strategy=vad, response_format="verbose_json")
    as_json = post(http, chunking_strategy=json.dumps(vad), response_format="verbose_json").json()
    auto = transcribe(client, chunking_strategy="auto", response_format="verbose_json")
    assert as_sdk.text == as_json["text"] == auto.text  # 11 s is one piece whatever the options
    assert len(as_sdk.segments) == len(as_json["segments"]) == 1


# -- streaming -------------------------------------------------------------------------------------
def test_stream_parsed_by_the_sdk(client: Any) -> None:
    events = list(transcribe(client, stream=True))
    *deltas, done = events
    assert deltas and all(e.type == "transcript.text.delta" for e in deltas)
    assert done.type == "transcript.text.done"
    assert done.text == "".join(e.delta for e in deltas) == transcribe(client).text
    assert done.usage.type == "tokens" and done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


def test_stream_events(http: httpx.Client) -> None:
    r = post(http, stream="true", response_format="text")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert "[DONE]" not in r.text
    assert {e["type"] for e in payloads[:-1]} == {"transcript.text.delta"} and payloads[-1][
        "type"
    ] == "transcript.text.done"
    assert payloads[-1]["text"] == "".join(e["delta"] for e in payloads[:-1])


@pytest.mark.parametrize("fmt", ["srt", "vtt", "verbose_json"])
def test_stream_with_timed_formats_is_400(http: httpx.Client, fmt: str) -> None:
    assert assert_openai_error(post(http, stream="true", response_format=fmt), 400)["param"] == "stream"


# -- translation -----------------------------------------------------------------------------------
def test_translation_formats(http: httpx.Client, client: Any) -> None:
    fr = AUDIO / "speech_fr.wav"
    assert isinstance(post(http, "translations", fr).json()["text"], str)
    verbose = post(http, "translations", fr, response_format="verbose_json").json()
    assert verbose["task"] == "translate" and verbose["language"] == "english" and len(verbose["segments"]) == 1
    with fr.open("rb") as f:
        srt = client.audio.translations.create(model="tiny", file=f, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ") and cue_text(verbose["segments"][0]["text"]) in srt
    with fr.open("rb") as f:
        assert client.audio.translations.create(model="tiny", file=f, response_format="text").endswith("\n")


def test_translation_prompt_is_passed_as_context(http: httpx.Client) -> None:
    fr = AUDIO / "speech_fr.wav"
    plain = post(http, "translations", fr).json()["usage"]["input_tokens"]
    prompted = post(http, "translations", fr, prompt="A pangram about a fox.").json()["usage"]["input_tokens"]
    assert prompted > plain


def test_translation_stream(http: httpx.Client) -> None:
    r = post(http, "translations", AUDIO / "speech_fr.wav", stream="true")
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "transcript.text.done" and events[-1]["text"]
