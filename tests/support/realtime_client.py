"""A raw realtime WebSocket client for tests: every server event it receives is checked against OpenAI's
schemas (when OPENAI_OPENAPI_SPEC names the spec), plus the audio it streams in each input format."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import soundfile as sf
import soxr
import yaml
from websockets.client import ClientProtocol
from websockets.frames import Close
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from app.audio_formats import ALAW, ULAW

DATA = Path(__file__).resolve().parents[1] / "data"
SCHEMAS = {
    "session.created": "RealtimeServerEventSessionCreated",
    "session.updated": "RealtimeServerEventSessionUpdated",
    "input_audio_buffer.committed": "RealtimeServerEventInputAudioBufferCommitted",
    "input_audio_buffer.cleared": "RealtimeServerEventInputAudioBufferCleared",
    "input_audio_buffer.speech_started": "RealtimeServerEventInputAudioBufferSpeechStarted",
    "input_audio_buffer.speech_stopped": "RealtimeServerEventInputAudioBufferSpeechStopped",
    "conversation.item.input_audio_transcription.delta": (
        "RealtimeServerEventConversationItemInputAudioTranscriptionDelta"
    ),
    "conversation.item.input_audio_transcription.completed": (
        "RealtimeServerEventConversationItemInputAudioTranscriptionCompleted"
    ),
    "conversation.item.input_audio_transcription.failed": (
        "RealtimeServerEventConversationItemInputAudioTranscriptionFailed"
    ),
    "error": "RealtimeServerEventError",
}
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


@functools.cache
def spec() -> dict[str, Any] | None:
    """OpenAI's spec, from the file OPENAI_OPENAPI_SPEC names (None when unset: no schema checks)."""
    path = os.environ.get("OPENAI_OPENAPI_SPEC")
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        loaded: dict[str, Any] = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return loaded


def check_event(event: dict[str, Any]) -> None:
    assert event.get("type") in SCHEMAS, event
    loaded = spec()
    if loaded is not None:
        schema = {"$ref": f"#/components/schemas/{SCHEMAS[event['type']]}", "components": loaded["components"]}
        jsonschema.Draft202012Validator(schema).validate(event)


class Raw:
    """One session over a plain WebSocket; `events` keeps everything received, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    def send(self, **event: Any) -> None:
        self.ws.send(json.dumps(event))

    def recv(self, timeout: float = 60) -> dict[str, Any]:
        event = json.loads(self.ws.recv(timeout))
        check_event(event)
        self.events.append(event)
        return dict(event)

    def until(self, kind: str, count: int = 1, timeout: float = 120) -> list[dict[str, Any]]:
        """Events up to the `count`th one of type `kind`."""
        out = []
        while sum(e["type"] == kind for e in out) < count:
            out.append(self.recv(timeout))
        return out

    def append(self, data: bytes, chunk: int) -> None:
        for at in range(0, len(data), chunk):
            self.send(type="input_audio_buffer.append", audio=base64.b64encode(data[at : at + chunk]).decode())

    def update(self, **input_: Any) -> dict[str, Any]:
        self.send(type="session.update", session={"type": "transcription", "audio": {"input": input_}})
        return self.until("session.updated")[-1]


def open_session(base_url: str, path: str = "/v1/realtime?intent=transcription", **kwargs: Any) -> Raw:
    raw = Raw(connect(base_url.replace("http://", "ws://") + path, **kwargs))
    assert raw.recv()["type"] == "session.created"
    return raw


def sentence() -> np.ndarray:
    """2.9 s of French speech at 16 kHz."""
    return np.asarray(sf.read(DATA / "speech_fr.wav", dtype="float32")[0])


def gap(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.float32)


def two_utterances() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Two sentences 1.5 s apart, and where each one is (seconds)."""
    s = sentence()
    audio = np.concatenate([gap(0.5), s, gap(1.5), s, gap(1.5)])
    length = s.shape[0] / 16000
    return audio, [(0.5, 0.5 + length), (2.0 + length, 2.0 + 2 * length)]


def encode(audio16: np.ndarray, audio_format: str) -> bytes:
    """16 kHz float32 -> the wire bytes of `audio_format` (G.711 by nearest code: the codec's definition)."""
    if audio_format == "audio/pcm":
        return bytes((np.clip(soxr.resample(audio16, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes())
    table = ULAW if audio_format == "audio/pcmu" else ALAW
    narrow = soxr.resample(audio16, 16000, 8000).astype(np.float32)
    return bytes(np.concatenate([_nearest(table, part) for part in np.array_split(narrow, 32)]).astype(np.uint8))


def _nearest(table: np.ndarray, samples: np.ndarray) -> np.ndarray:
    return np.argmin(np.abs(samples[:, None] - table[None, :]), axis=1)


def chunk_bytes(audio_format: str, ms: int = 100) -> int:
    """Bytes of `ms` of audio in `audio_format`."""
    return ms * 48 if audio_format == "audio/pcm" else ms * 8


def texts(events: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
    """(item_id, the deltas joined, the completed transcript) of each completed item, in order."""
    for event in events:
        if event["type"] == COMPLETED:
            deltas = "".join(e["delta"] for e in events if e["type"] == DELTA and e["item_id"] == event["item_id"])
            yield event["item_id"], deltas, event["transcript"]


def never_reading(url: str, message: bytes, sends: int = 3000) -> Close | None:
    """A client with a 4 KiB receive window that sends `message` up to `sends` times and reads nothing until
    it can send no more (the server stopped reading, or closed): the close frame the server sent it, if any."""
    address = url.removeprefix("ws://").split("/")[0].split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
        sock.connect((address[0], int(address[1])))
        sock.settimeout(5)
        client = ClientProtocol(parse_uri(url))
        client.send_request(client.connect())
        sock.sendall(b"".join(client.data_to_send()))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        client.receive_data(head)
        assert client.events_received()[0].status_code == 101
        with contextlib.suppress(OSError):  # the server stops reading once it has closed the session
            for _ in range(sends):
                client.send_text(message)
                sock.sendall(b"".join(client.data_to_send()))
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                client.receive_data(chunk)
        return client.close_rcvd
