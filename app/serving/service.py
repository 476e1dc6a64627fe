"""The serving layer's one entry point: each use case as one call, for the routes and realtime sessions.

It wires the prep threads, the engine and the model facade together; the use cases themselves live in
`chat.py` and `transcription.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from app import vad
from app.config import Settings
from app.engine.engine import Engine
from app.model.runtime import ModelRuntime
from app.serving.chat import ChatAnswer, ChatServing
from app.serving.prep import Prep
from app.serving.record import RequestRecord
from app.serving.schemas import ChatCompletionRequest
from app.serving.transcription import TranscriptionRun, TranscriptionServing, Upload
from app.serving.transcription_request import AudioForm
from app.serving.transcripts import Task, TranscriptionOptions
from app.types import PreparedRequest, SamplingParams

T = TypeVar("T")


class Serving:
    def __init__(self, settings: Settings, engine: Engine, runtime: ModelRuntime) -> None:
        self.settings, self.engine, self.runtime = settings, engine, runtime
        self.prep = Prep(settings, runtime)
        self.chats = ChatServing(settings, runtime, self.prep, engine)
        self.transcriptions = TranscriptionServing(self.prep, engine)

    @property
    def fingerprint(self) -> str:
        """The loaded model's `system_fingerprint`, for chat answers."""
        return self.runtime.fingerprint

    @property
    def model_ids(self) -> set[str]:
        return self.prep.model_ids

    def check_model(self, model: str | None) -> None:
        self.prep.check_model(model)

    async def chat(self, body: ChatCompletionRequest, record: RequestRecord | None = None) -> ChatAnswer:
        return await self.chats.start(body, record)

    async def transcribe(
        self, form: AudioForm, upload: Upload, task: Task, record: RequestRecord | None = None
    ) -> TranscriptionRun:
        return await self.transcriptions.transcribe(form, upload, task, record)

    async def utterance(self, audio: np.ndarray, options: TranscriptionOptions) -> TranscriptionRun:
        return await self.transcriptions.utterance(audio, options)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """CPU work of a realtime session (its speech detector, large appends) in a prep thread."""
        return await self.prep.run(fn, *args)

    async def warm_up(self) -> None:
        """One tiny generation so the first real request pays no one-time cost."""
        encoded = self.runtime.prompter.chat([{"role": "user", "content": "Hi"}])
        request = PreparedRequest(encoded.input_ids, [], SamplingParams(max_new_tokens=2), "chat")
        await self.engine.generate(request)
        await asyncio.to_thread(vad.network)  # the speech detector of chunking and realtime turns

    def close(self) -> None:
        self.prep.close()
