"""A Voxtral Realtime model behind /v1/realtime and /v1/audio/transcriptions, through the `openai` SDK: deltas
while audio arrives, `.completed` after the commit, equal to the model layer's own tokens for the same audio."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from app.audio_formats import InputDecoder
from app.model.compute.loader import LoadedModel
from app.model.realtime.engine import RealtimeEngine
from tests.support.realtime_client import chunk_bytes, encode, sentence, two_utterances
from tests.support.server import RunningServer, serve

MODEL = "tiny-realtime"
COMPLETED = "conversation.item.input_audio_transcription.completed"


@pytest.fixture(scope="module")
def server(realtime_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve(realtime_model, tmp_path_factory.mktemp("rt-serve"), model=MODEL) as running:
        yield running


def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def model_text(loaded: LoadedModel, data: bytes, chunk: int) -> str:
    """The model layer alone: the audio the session decodes (same chunks), fed, flushed, ticked to the end."""
    decoder = InputDecoder("audio/pcm")
    samples = np.concatenate([decoder.push(data[at : at + chunk]) for at in range(0, len(data), chunk)])
    engine = RealtimeEngine(loaded.model, loaded.processor, max_streams=1)
    sid = engine.open(None)
    engine.feed(sid, np.concatenate([samples, decoder.flush()]))
    engine.flush(sid)
    steps = []
    while not (steps and steps[-1].final):
        steps += engine.tick().steps
    return "".join(s.text for s in steps)


def session(connection: Any, transcription: dict[str, Any], vad: dict[str, Any] | None) -> None:
    assert connection.recv().type == "session.created"
    audio_input = {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": transcription}
    connection.session.update(
        session={"type": "transcription", "audio": {"input": audio_input | {"turn_detection": vad}}}
    )


def send(connection: Any, data: bytes, chunk: int) -> None:
    for at in range(0, len(data), chunk):
        connection.input_audio_buffer.append(audio=base64.b64encode(data[at : at + chunk]).decode())


def until_completed(connection: Any, count: int) -> list[Any]:
    events: list[Any] = []
    while sum(e.type == COMPLETED for e in events) < count:
        events.append(connection.recv())
        assert events[-1].type != "error", events[-1]
    return events


def test_manual_commit_streams_deltas_before_the_commit(server: RunningServer, realtime_model: LoadedModel) -> None:
    data, chunk = encode(np.tile(sentence(), 2), "audio/pcm"), chunk_bytes("audio/pcm")
    with sdk(server).realtime.connect(model=MODEL, extra_query={"intent": "transcription"}) as connection:
        session(connection, {"model": MODEL, "delay": "medium"}, None)
        assert connection.recv().type == "session.updated"
        half = len(data) // 2 // chunk * chunk
        send(connection, data[:half], chunk)
        events = [connection.recv()]  # the speaker has not finished: the text of what was said comes already
        while events[-1].type != "conversation.item.input_audio_transcription.delta":
            assert events[-1].type != "error", events[-1]
            events.append(connection.recv())
        send(connection, data[half:], chunk)
        connection.input_audio_buffer.commit()
        events += until_completed(connection, 1)
    kinds = [e.type for e in events]
    assert (
        "input_audio_buffer.committed" not in kinds[: kinds.index("conversation.item.input_audio_transcription.delta")]
    )
    done = events[-1]
    deltas = "".join(e.delta for e in events if e.type.endswith(".delta") and e.item_id == done.item_id)
    assert done.transcript and done.transcript == deltas == model_text(realtime_model, data, chunk)
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {done.item_id}


def test_server_vad_commits_each_utterance(server: RunningServer) -> None:
    audio, _ = two_utterances()
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    with sdk(server).realtime.connect(model=MODEL, extra_query={"intent": "transcription"}) as connection:
        session(connection, {"model": MODEL, "delay_ms": 240}, vad)
        assert connection.recv().type == "session.updated"
        send(connection, encode(audio, "audio/pcm"), chunk_bytes("audio/pcm"))
        events = until_completed(connection, 2)
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == kinds.count("input_audio_buffer.speech_stopped") == 2
    committed = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    completed = [e for e in events if e.type == COMPLETED]
    assert [e.item_id for e in completed] == committed
    for done in completed:
        deltas = [e.delta for e in events if e.type.endswith(".delta") and e.item_id == done.item_id]
        assert done.transcript == "".join(deltas)


def test_a_bad_delay_is_an_error_and_the_session_lives_on(server: RunningServer) -> None:
    with sdk(server).realtime.connect(model=MODEL, extra_query={"intent": "transcription"}) as connection:
        session(connection, {"model": MODEL, "delay_ms": 100}, None)
        error = connection.recv()
        assert error.type == "error" and error.error.param == "session.audio.input.transcription.delay"
        connection.session.update(
            session={"type": "transcription", "audio": {"input": {"transcription": {"delay": "fast"}}}}
        )
        assert connection.recv().type == "error"
        connection.session.update(
            session={"type": "transcription", "audio": {"input": {"transcription": {"delay": "low"}}}}
        )
        updated = connection.recv()
        assert updated.type == "session.updated"


def test_http_transcription_equals_its_stream(server: RunningServer, tmp_path: Path) -> None:
    import soundfile as sf

    path = tmp_path / "speech.wav"
    sf.write(path, sentence(), 16000)
    client = sdk(server)
    with path.open("rb") as f:
        whole = client.audio.transcriptions.create(model=MODEL, file=f)
    with path.open("rb") as f:
        events = list(client.audio.transcriptions.create(model=MODEL, file=f, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert events[-1].type == "transcript.text.done" and events[-1].text == deltas == whole.text
    with path.open("rb") as f, pytest.raises(openai.BadRequestError, match="segment timestamps"):
        client.audio.transcriptions.create(model=MODEL, file=f, response_format="srt")
    with pytest.raises(openai.BadRequestError, match="only transcribes"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="only transcribes"):
        client.responses.create(model=MODEL, input="Hi")
