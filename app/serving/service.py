"""The serving layer's entry point for the HTTP routes: each use case as one call.

It wires the prep threads, the engine and the model facade together; the use cases themselves live in
`chat.py` and `transcription.py`. Realtime sessions have their own entry point on the same prep threads
and transcription path (`app.serving.realtime.service.RealtimeServing`).
"""

from __future__ import annotations

import asyncio

from app import vad
from app.config import Settings
from app.engine.engine import Engine
from app.model.runtime import ModelRuntime
from app.serving.chat import ChatAnswer, Chats, ChatServing
from app.serving.prep import Prep
from app.serving.record import RequestRecord
from app.serving.schemas import ChatCompletionRequest
from app.serving.transcription import TranscriptionRun, TranscriptionServing, Upload
from app.serving.transcription_request import AudioForm
from app.serving.transcripts import Task
from app.types import PreparedRequest, SamplingParams


class Routes:
    """What every model's serving answers alike: its model ids, the request's model checked, and chat through
    its `chats` (a 400 where the model does not chat)."""

    prep: Prep
    chats: Chats

    @property
    def model_ids(self) -> set[str]:
        return self.prep.model_ids

    def check_model(self, model: str | None) -> None:
        self.prep.check_model(model)

    async def chat(
        self, body: ChatCompletionRequest, record: RequestRecord | None = None, owner: str = ""
    ) -> ChatAnswer:
        """`owner`: an opaque key of the client (never a secret): its share of the queue and the batch."""
        return await self.chats.start(body, record, owner)


class Serving(Routes):
    def __init__(self, settings: Settings, engine: Engine, runtime: ModelRuntime) -> None:
        self.settings, self.engine, self.runtime = settings, engine, runtime
        self.prep = Prep(settings, runtime)
        self.chats = ChatServing(settings, runtime, self.prep, engine)
        self.transcriptions = TranscriptionServing(settings, runtime, self.prep, engine)

    @property
    def fingerprint(self) -> str:
        """The loaded model's `system_fingerprint`, for chat answers."""
        return self.runtime.fingerprint

    async def transcribe(
        self, form: AudioForm, upload: Upload, task: Task, record: RequestRecord | None = None, owner: str = ""
    ) -> TranscriptionRun:
        return await self.transcriptions.transcribe(form, upload, task, record, owner)

    async def warm_up(self) -> None:
        """One tiny generation so the first real request pays no one-time cost."""
        encoded = self.runtime.prompter.chat([{"role": "user", "content": "Hi"}])
        request = PreparedRequest(encoded.input_ids, [], SamplingParams(max_new_tokens=2), "chat")
        await self.engine.generate(request)
        await asyncio.to_thread(vad.network)  # the speech detector of chunking and realtime turns

    def close(self) -> None:
        self.prep.close()
