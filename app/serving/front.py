"""What the HTTP routes and the start-up call on the serving layer, whichever model is served: `Serving` (a
Voxtral model over the engine) or `StreamingServing` (a Voxtral Realtime model over its ticking loop, which
refuses chat with a 400). The composition root builds one; nothing downstream asks which."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from app.serving.chat import ChatAnswer
from app.serving.record import RequestRecord
from app.serving.schemas import ChatCompletionRequest
from app.serving.transcription import Upload
from app.serving.transcription_request import AudioForm
from app.serving.transcripts import Task, Transcript, TranscriptDelta


class TranscriptionAnswer(Protocol):
    """One transcription under way: wait for its `result()` or stream its `deltas()`; `cancel()` stops it."""

    def cancel(self) -> None: ...

    async def result(self) -> Transcript: ...

    def deltas(self) -> AsyncIterator[TranscriptDelta | Transcript]: ...


class Front(Protocol):
    @property
    def fingerprint(self) -> str:
        """The `system_fingerprint` of chat answers."""
        ...

    @property
    def model_ids(self) -> set[str]: ...

    async def chat(
        self, body: ChatCompletionRequest, record: RequestRecord | None = None, owner: str = ""
    ) -> ChatAnswer: ...

    async def transcribe(
        self, form: AudioForm, upload: Upload, task: Task, record: RequestRecord | None = None, owner: str = ""
    ) -> TranscriptionAnswer: ...

    async def warm_up(self) -> None:
        """One request through the model, so the first real one pays no one-time cost."""
        ...

    def close(self) -> None: ...
