"""The decode step sees only the shapes listed at start-up, whatever the workload (issue 26, point 1).

A CUDA graph replays one (rows, width); a step of any other shape would run eagerly, or, captured lazily,
allocate and capture mid-serving. So every step the real server runs must be padded to one of the
generator's `sizes` rows and `widths` positions. This test drives the real app over HTTP with the `openai`
client and a workload that exercises every way rows come and go at once: requests of different lengths
joining and leaving mid-flight, `n` = 3 (rows fanned out by copying slots), grammar rows (a JSON schema
and a required tool call), audio of several 30 s windows in one row and a long transcription cut into
pieces that decode as rows of their own, streamed and not. It then reads every (rows, width) the step saw
(`StepGraphs.seen`) and checks each is listed, that the workload really reached several sizes and widths
(else the check would be blind), and that every answer is a 200 of the right shape."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import soundfile as sf

from app.model.compute.generate import BatchGenerator
from app.model.compute.loader import LoadedModel
from tests.support.audio_fixtures import JFK, wav_b64
from tests.support.server import RunningServer, serve
from tests.support.tool_fixtures import TOOLS, WEATHER, assert_valid_calls

Call = Callable[[Any], None]
"""One request of the workload, made with the `openai` client, checking its own answer."""


def _speech(seconds: float) -> np.ndarray:
    """JFK's 11 s with a second of silence after each, `seconds` long: long audio a chunker can cut."""
    once = np.concatenate([JFK, np.zeros(16000, np.float32)])
    return np.resize(once, int(16000 * seconds)).astype(np.float32)


def _wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _chat(words: int, max_tokens: int, stream: bool = False) -> Call:
    def call(client: Any) -> None:
        messages = [{"role": "user", "content": "tell me " * words}]
        if not stream:
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
            assert len(r.choices) == 1 and r.choices[0].finish_reason in ("stop", "length")
            assert r.usage.completion_tokens <= max_tokens
            return
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=max_tokens, temperature=0, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    return call


def _choices(client: Any) -> None:
    messages = [{"role": "user", "content": "three ways " * 30}]
    r = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=24, temperature=0.9, seed=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def _schema(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    messages = [{"role": "user", "content": "weather?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt, temperature=1.0, seed=2)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)


def _tools(client: Any) -> None:
    messages = [{"role": "user", "content": "call something"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", temperature=1.0, seed=7, n=2
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        assert_valid_calls(choice, {"get_weather", "get_time"})


def _audio_chat(seconds: float, stream: bool) -> Call:
    """A chat over `seconds` of audio: one row of several 30 s windows."""
    audio = {"type": "input_audio", "input_audio": {"data": wav_b64(_speech(seconds)), "format": "wav"}}
    messages = [{"role": "user", "content": [audio, {"type": "text", "text": "What is said?"}]}]

    def call(client: Any) -> None:
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
                )
            )
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            return
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert r.usage.prompt_tokens > 375 * int(seconds // 30)  # every window's audio tokens

    return call


def _transcription(seconds: float, stream: bool) -> Call:
    """A transcription of `seconds` cut at silences into pieces of at most 30 s, each a row."""
    data = _wav(_speech(seconds))

    def call(client: Any) -> None:
        file = ("long.wav", data)
        if stream:
            events = list(
                client.audio.transcriptions.create(model="tiny", file=file, chunking_strategy="auto", stream=True)
            )
            assert events[-1].type == "transcript.text.done"
            return
        r = client.audio.transcriptions.create(
            model="tiny", file=file, chunking_strategy="auto", response_format="verbose_json"
        )
        assert len(r.segments) >= 2 and r.duration >= seconds - 0.1

    return call


WORKLOAD: list[Call] = [
    _chat(2, 3),
    _chat(60, 40, stream=True),  # 124 prompt tokens: crosses from width 128 to the next if it runs alone
    _choices,
    _schema,
    _tools,
    _chat(5, 20),
    _audio_chat(65, stream=False),  # 3 windows, 1125 audio positions: the widest step
    _chat(10, 8, stream=True),
    _transcription(40, stream=True),
    _chat(3, 1),
    _transcription(35, stream=False),
    _audio_chat(35, stream=True),
    _chat(30, 30),
    _chat(1, 60, stream=True),
]


def _generator(server: RunningServer) -> BatchGenerator:
    inner = server.generator.inner if server.generator else None
    assert isinstance(inner, BatchGenerator)
    return inner


def test_a_mixed_workload_steps_only_listed_shapes(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, max_batch_size=32, max_wait_ms=20) as server:
        generator = _generator(server)
        client = server.client(timeout=120)
        with ThreadPoolExecutor(len(WORKLOAD)) as pool:  # all at once: rows join and leave a running batch
            for done in [pool.submit(call, client) for call in WORKLOAD]:
                done.result()  # raises what an answer's check found (openai raises on any non-200)
        seen = set(generator.graphs.seen)
    listed = {(rows, width) for rows in generator.sizes for width in generator.widths}
    assert seen <= listed, sorted(seen - listed)
    assert len({rows for rows, _ in seen}) >= 3, sorted(seen)
    seen_widths = {width for _, width in seen}
    assert 128 in seen_widths and max(seen_widths) > 1125 and len(seen_widths) >= 3, sorted(seen)
