"""The chat use case: admit, read the messages (audio decoded, tools and formats compiled), build the prompt,
queue it, then answer whole (`ChatResult`) or as typed deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from app.config import Settings
from app.engine.engine import Engine
from app.engine.ticket import Ticket
from app.errors import GrammarError
from app.model.runtime import ModelRuntime
from app.model.values import OutputSpec
from app.serving import chat_request as chat
from app.serving.chat_audio import PartKey, audio_parts, decode_within, unpack_within
from app.serving.chat_request import ChatJob
from app.serving.chat_stream import chat_deltas
from app.serving.deltas import ChatDelta
from app.serving.logprobs import TokenScore, chat_content
from app.serving.prep import Prep
from app.serving.record import RequestRecord
from app.serving.schemas import ChatCompletionRequest
from app.types import Constraint, ParsedCall, PreparedRequest


@dataclass(frozen=True)
class ChoiceResult:
    content: str | None
    calls: tuple[ParsedCall, ...]
    finish_reason: str
    logprobs: list[TokenScore] | None
    """None when the request did not ask for them."""


@dataclass(frozen=True)
class ChatResult:
    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    """Every choice's tokens (the prompt counts once)."""
    cached_tokens: int = 0
    """Of `prompt_tokens`, those taken from the prefix cache."""


class ChatAnswer:
    """A queued chat request: wait for its `result()`, or stream its `deltas()`; `cancel()` stops it."""

    def __init__(self, job: ChatJob, ticket: Ticket) -> None:
        self._job, self._ticket = job, ticket

    async def result(self) -> ChatResult:
        """Each of the `n` choices' tokens read as text or tool calls."""
        result = await self._ticket.result()  # cancels its request however it ends
        job, results = self._job, result.choices or [result]
        stops = job.prepared.sampling.stop_strings
        choices = []
        for r in results:
            out = job.runtime.chat_output(r.token_ids, r.finish_reason, job.tool_names, stops)
            scores = chat_content(job.runtime.vocab, r.logprobs) if r.logprobs is not None else None
            choices.append(ChoiceResult(out.content, out.calls, out.finish_reason, scores))
        completion = sum(len(r.token_ids) for r in results)
        return ChatResult(choices, result.prompt_tokens, completion, result.cached_tokens)

    def deltas(self) -> AsyncIterator[ChatDelta]:
        return chat_deltas(self._job, self._ticket)

    def cancel(self) -> None:
        self._ticket.cancel()


class Chats(Protocol):
    """What Responses (and the chat route) start a chat through: `ChatServing`, or a transcription-only model's
    refusal (`app.serving.streaming.TranscriptionOnly`)."""

    async def start(self, body: ChatCompletionRequest, record: RequestRecord | None, owner: str = "") -> ChatAnswer:
        """Queue the chat, or raise the VoxtralError that refuses it."""
        ...


class ChatServing:
    def __init__(self, settings: Settings, runtime: ModelRuntime, prep: Prep, engine: Engine) -> None:
        self.settings, self.runtime, self.prep, self.engine = settings, runtime, prep, engine

    async def start(self, body: ChatCompletionRequest, record: RequestRecord | None, owner: str = "") -> ChatAnswer:
        """Hold a queue place while the request is prepared (a full queue, or `owner`, an opaque client key,
        past its share, refuses before any decoding)."""
        with self.engine.admission(owner) as reservation:
            job = await self.prepare(body, record)
            ticket = self.engine.submit(job.prepared, stream=body.stream, reservation=reservation)
        if record is not None:
            record.add_tickets([ticket], self.runtime.text)
        return ChatAnswer(job, ticket)

    async def prepare(self, body: ChatCompletionRequest, record: RequestRecord | None = None) -> ChatJob:
        settings, runtime = self.settings, self.runtime
        self.prep.check_model(body.model)
        chat.check_unsupported(body, self.engine.config.max_batch_size)  # capped at the KV cache's slots
        spec = chat.output_spec(body)
        messages = [chat.message_fields(m) for m in body.messages]  # its refusals cost nothing: before the audio
        audios = await self._audios(body, record)
        for index, (message, fields) in enumerate(zip(body.messages, messages, strict=True)):
            if isinstance(message.content, list):
                fields["content"] = [_part(p, audios.get((index, j))) for j, p in enumerate(message.content)]
        encoded = await self.prep.run(runtime.prompter.chat, messages, chat.prompt_tools(body))
        sampling = chat.chat_sampling(body, len(encoded.input_ids), settings)
        prepared = PreparedRequest(encoded.input_ids, encoded.audios, sampling, "chat", cache_salt=body.cache_salt)
        prepared.constraint_factory = await self.prep.run(self._constraint, spec)
        if prepared.constraint_factory is not None:
            shortest = await self.prep.run(runtime.constrainer.shortest, spec)
            if shortest is not None and sampling.max_new_tokens < shortest:
                raise chat.minimum_refused(sampling.max_new_tokens, shortest)
        return ChatJob(prepared, runtime, chat.tool_names(spec))

    def _constraint(self, spec: OutputSpec) -> Callable[[], Constraint] | None:
        try:
            return self.runtime.constrainer.factory(spec)
        except GrammarError as exc:
            raise chat.grammar_refused(spec, exc) from exc

    async def _audios(self, body: ChatCompletionRequest, record: RequestRecord | None) -> dict[PartKey, np.ndarray]:
        """Every audio part decoded, the request's limits checked before each costs memory (chat_audio.py)."""
        parts = audio_parts(body, self.settings)
        if not parts:
            return {}
        budget = self.settings.max_chat_audio_s
        unpacked = await self.prep.run(unpack_within, parts, budget)
        return await decode_within(parts, unpacked, self.prep, budget, record)


def _part(part: Any, audio: np.ndarray | None) -> dict[str, Any]:
    """A content part in Mistral's terms: text, or the decoded audio of an audio part."""
    if audio is None:
        return {"type": "text", "text": part.text}
    return {"type": "input_audio", "audio": audio}
