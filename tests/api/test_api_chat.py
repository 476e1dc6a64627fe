"""Chat completions through the official openai SDK: audio parts, turns, text only, errors, streaming."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf

from app.model.compute.loader import LoadedModel
from tests.support.checks import assert_openai_error
from tests.support.server import AUDIO, serve

JFK = base64.b64encode((AUDIO / "jfk.wav").read_bytes()).decode()
FR = base64.b64encode((AUDIO / "speech_fr.wav").read_bytes()).decode()


def audio_part(data: str = JFK, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def ask(client: Any, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=kw.pop("max_tokens", 8), **kw)


def test_one_audio(client: Any) -> None:
    r = ask(client, [{"role": "user", "content": [audio_part(), {"type": "text", "text": "What is said?"}]}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 375
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_every_answer_and_chunk_carries_the_models_fingerprint(client: Any, loaded: LoadedModel) -> None:
    text = [{"role": "user", "content": "Hi"}]
    answers = [ask(client, text, max_tokens=2) for _ in range(2)]
    chunks = list(ask(client, text, max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and len(chunks) >= 3
    assert {r.system_fingerprint for r in answers + chunks} == {loaded.fingerprint}


def test_two_audios_cost_two_audio_windows(client: Any) -> None:
    one = ask(client, [{"role": "user", "content": [audio_part(), {"type": "text", "text": "Compare."}]}])
    two = ask(
        client,
        [{"role": "user", "content": [audio_part(), audio_part(FR), {"type": "text", "text": "Compare."}]}],
    )
    assert two.usage.prompt_tokens - one.usage.prompt_tokens >= 375


def test_multi_turn_with_audio_in_several_turns(client: Any) -> None:
    messages = [
        {"role": "user", "content": [audio_part(), {"type": "text", "text": "Transcribe."}]},
        {"role": "assistant", "content": "And so my fellow Americans."},
        {"role": "user", "content": [audio_part(FR), {"type": "text", "text": "And this one?"}]},
    ]
    r = ask(client, messages)
    assert r.usage.prompt_tokens > 750


def test_text_only(client: Any) -> None:
    r = ask(client, [{"role": "user", "content": "Hello, who are you?"}], max_tokens=4)
    assert r.usage.prompt_tokens < 30 and r.usage.completion_tokens == 4


def test_bare_base64_input_audio_as_mistral_clients_send(http: Any) -> None:
    body = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": JFK}]}],
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_data_url_audio(http: Any) -> None:
    url = "data:audio/wav;base64," + JFK
    body = {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}],
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_greedy_is_deterministic_and_seeded_sampling_repeats(client: Any) -> None:
    msgs = [{"role": "user", "content": [audio_part(), {"type": "text", "text": "Say something."}]}]
    assert (
        ask(client, msgs, temperature=0).choices[0].message.content
        == ask(client, msgs, temperature=0).choices[0].message.content
    )
    a = ask(client, msgs, temperature=1.0, seed=7, max_tokens=12).choices[0].message.content
    b = ask(client, msgs, temperature=1.0, seed=7, max_tokens=12).choices[0].message.content
    assert a == b


def test_stop_string_is_trimmed(client: Any) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    full = ask(client, msgs, temperature=0, max_tokens=16).choices[0].message.content
    stop = full[5:7]
    assert stop.strip()
    r = ask(client, msgs, temperature=0, max_tokens=16, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.find(stop)]


def test_an_empty_stop_string_stops_nothing(client: Any) -> None:
    r = ask(client, [{"role": "user", "content": "Hello"}], temperature=0, max_tokens=8, stop=["", "\u0000\u0001"])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8


def test_streaming_matches_non_streaming(client: Any) -> None:
    msgs = [{"role": "user", "content": [audio_part(), {"type": "text", "text": "What?"}]}]
    whole = ask(client, msgs, temperature=0, max_tokens=12)
    stream = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": [audio_part("not base64!!")]}]}, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "audio_url", "audio_url": {"url": "data:image/png;base64," + JFK}}],
                    }
                ]
            },
            "messages",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "audio_url", "audio_url": {"url": "http://example.com/a.wav"}}],
                    }
                ]
            },
            "messages",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be nice."},
                    {"role": "user", "content": [audio_part()]},
                ]
            },
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
    ],
)
def test_bad_chat_requests_are_400(http: Any, body: dict[str, Any], param: str) -> None:
    error = assert_openai_error(http.post("/v1/chat/completions", json={"model": "tiny", **body}), 400)
    assert error["param"] and error["param"].startswith(param), error


def test_system_prompt_with_audio_says_why(http: Any) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": [audio_part()]}],
    }
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert "system" in error["message"].lower()


def test_unknown_model_is_404_and_unknown_fields_ignored(client: Any, http: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "store": True,
        "metadata": {"a": "b"},
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_invalid_json_is_400(http: Any) -> None:
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_system_message_is_fine_for_text_only_and_the_rest_of_the_request_is_accepted(client: Any) -> None:
    messages = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
    r = ask(client, messages, user="someone", presence_penalty=0.5, frequency_penalty=0.5, seed=3, temperature=0.7)
    assert r.choices[0].finish_reason == "length"


def silent_flac(seconds: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(16000 * seconds, dtype=np.float32), 16000, format="FLAC")
    return base64.b64encode(buffer.getvalue()).decode()


def test_context_limit_counts_audio_tokens_and_refuses_before_queueing(
    server: Any, http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 minutes of audio are 15,000 prompt tokens: with 20,000 more asked for, 32k cannot hold it."""
    submitted: list[Any] = []
    monkeypatch.setattr(server.engine, "submit", lambda *a, **k: submitted.append(a))
    audio = audio_part(silent_flac(1200), "flac")
    body = {"model": "tiny", "max_tokens": 20_000, "messages": [{"role": "user", "content": [audio]}]}
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    numbers = [int(n) for n in re.findall(r"\d+", error["message"])]
    prompt = next(n for n in numbers if 15_000 <= n <= 16_000)
    assert {32768, 20000, prompt + 20000} <= set(numbers)
    assert submitted == []


def test_an_error_mid_stream_arrives_as_an_error_event(loaded: Any, tiny_dir: Any) -> None:
    steps = []

    def fail_on_third_step(stage: str, items: list[Any]) -> None:
        if stage == "step":
            steps.append(stage)
            if len(steps) == 3:
                raise RuntimeError("simulated device failure")

    with serve(loaded, tiny_dir) as running:
        running.generator.fault = fail_on_third_step
        stream = running.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=50, stream=True
        )
        seen = []
        with pytest.raises(openai.APIError, match="The model failed"):
            for chunk in stream:
                seen.append(chunk)
    assert seen and seen[0].choices[0].delta.role == "assistant"
