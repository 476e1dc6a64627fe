"""/v1/realtime through the official `openai` SDK's realtime client, as a user connects:
`client.realtime.connect(model=..., extra_query={"intent": "transcription"})`."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.model.compute.loader import LoadedModel
from tests.support.realtime_client import chunk_bytes, encode, sentence, two_utterances
from tests.support.server import RunningServer, serve

KEY = "sk-realtime-sdk-key"


@pytest.fixture(scope="module")
def server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, api_keys=[KEY]) as running:
        yield running


def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def transcribe(connection: Any, data: bytes, chunk: int, utterances: int) -> list[Any]:
    """Stream `data` in chunks, then collect events until `utterances` transcriptions completed."""
    for at in range(0, len(data), chunk):
        connection.input_audio_buffer.append(audio=base64.b64encode(data[at : at + chunk]).decode())
    events: list[Any] = []
    while sum(e.type == "conversation.item.input_audio_transcription.completed" for e in events) < utterances:
        events.append(connection.recv())
        assert events[-1].type != "error", events[-1]
    return events


def test_sdk_session_with_server_vad(server: RunningServer) -> None:
    audio, _ = two_utterances()
    with sdk(server).realtime.connect(model="tiny", extra_query={"intent": "transcription"}) as connection:
        assert connection.recv().type == "session.created"
        vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
        audio_input = {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "tiny"}}
        connection.session.update(
            session={"type": "transcription", "audio": {"input": audio_input | {"turn_detection": vad}}}
        )
        assert connection.recv().type == "session.updated"
        events = transcribe(connection, encode(audio, "audio/pcm"), chunk_bytes("audio/pcm"), 2)
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == kinds.count("input_audio_buffer.speech_stopped") == 2
    committed = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    completed = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert [e.item_id for e in completed] == committed
    for done in completed:
        deltas = [e.delta for e in events if e.type.endswith(".delta") and e.item_id == done.item_id]
        assert done.transcript == "".join(deltas) and done.usage.type == "tokens"


def test_sdk_manual_commit_in_mu_law(server: RunningServer) -> None:
    with sdk(server).realtime.connect(model="tiny", extra_query={"intent": "transcription"}) as connection:
        assert connection.recv().type == "session.created"
        audio_input = {"format": {"type": "audio/pcmu"}, "turn_detection": None}
        connection.session.update(session={"type": "transcription", "audio": {"input": audio_input}})
        assert connection.recv().type == "session.updated"
        data = encode(sentence(), "audio/pcmu")
        for at in range(0, len(data), 800):
            connection.input_audio_buffer.append(audio=base64.b64encode(data[at : at + 800]).decode())
        connection.input_audio_buffer.commit()
        events = transcribe(connection, b"", 1, 1)
    assert events[0].type == "input_audio_buffer.committed"
    assert events[-1].item_id == events[0].item_id
