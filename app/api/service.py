"""From a parsed request to a finished generation: resolve the model, decode audio, build the
prompt (CPU threads, off the event loop), check limits, then hand it to the engine.

Everything that can be refused is refused here, before the queue, so the worker only sees
requests it can run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from app import vad
from app.api import chat_request as chat
from app.api.chat_request import ChatJob
from app.api.logprobs import mean
from app.api.record import RequestRecord
from app.api.schemas import AudioUrlPart, ChatCompletionRequest, InputAudioPart, Message
from app.api.transcript_logprobs import TextLogprobs, text_logprobs
from app.api.transcripts import Delta, PieceResult, TextJoiner, Transcript, TranscriptionOptions, split_language
from app.audio import SAMPLE_RATE, AudioLimits, decode_audio
from app.chunking import Piece, split_at_silences, whole
from app.config import Settings
from app.engine.engine import Engine, Reservation
from app.engine.work import WorkItem
from app.errors import (
    ContextLengthExceeded,
    ModelNotFound,
    PayloadTooLarge,
)
from app.model.constrained import Constrainer, GrammarError, OutputSpec
from app.model.detok import IncrementalDecoder
from app.model.prompts import Encoded
from app.model.runtime import ModelRuntime
from app.types import Constraint, GenerationResult, PreparedRequest, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TranscriptionRun:
    """The pieces of one transcription, queued in the engine."""

    options: TranscriptionOptions
    duration_s: float
    pieces: list[Piece]
    items: list[WorkItem]

    def cancel(self) -> None:
        """No-op for finished pieces; stops the others (client gone, a piece failed, timeout)."""
        for item in self.items:
            item.cancel()

    def transcript(self, results: list[PieceResult]) -> Transcript:
        return Transcript(self.options, self.duration_s, results)


class Service:
    def __init__(self, settings: Settings, engine: Engine, runtime: ModelRuntime) -> None:
        self.settings = settings
        self.fingerprint = runtime.fingerprint  # the loaded model's system_fingerprint, for chat answers
        self.engine = engine
        self.runtime = runtime
        self.prompter = runtime.prompter
        self.model_ids = {settings.model_id, settings.model, *settings.model_aliases}
        self._pool = ThreadPoolExecutor(max_workers=settings.prep_threads, thread_name_prefix="voxtral-prep")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work (audio decoding, prompts, the speech detector) in a prep thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_model(self, model: str | None) -> None:
        if model and model not in self.model_ids:
            raise ModelNotFound(
                f"The model {model!r} does not exist. This server serves {self.settings.model_id!r}.",
                param="model",
            )

    async def warm_up(self) -> None:
        """One tiny generation so the first real request pays no one-time cost."""
        encoded = self.prompter.chat([{"role": "user", "content": "Hi"}])
        request = PreparedRequest(encoded.input_ids, [], SamplingParams(max_new_tokens=2), "chat")
        await self.engine.generate(request)
        await asyncio.to_thread(vad.network)  # the speech detector of chunking and realtime turns

    # -- transcription / translation -------------------------------------------------------------
    async def load_audio(
        self,
        data: bytes | Callable[[], bytes],
        filename: str | None,
        max_seconds: float,
        record: RequestRecord | None = None,
    ) -> np.ndarray:
        """`data` may be a function that unpacks it (base64 in JSON): it runs in a prep thread with the
        decoding, because unpacking the base64 of a 25 MB file takes ~100 ms that on the event loop
        would stall every other connection. The decoded seconds are added to `record`."""
        audio = await self.off_loop(self._decode, data, filename, AudioLimits(max_seconds=max_seconds))
        if record is not None:
            record.add_audio(audio)
        return audio

    def _decode(self, data: bytes | Callable[[], bytes], filename: str | None, limits: AudioLimits) -> np.ndarray:
        raw = data() if callable(data) else data
        if len(raw) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(f"The file is larger than the {self.settings.max_upload_mb:g} MB limit.")
        return decode_audio(raw, limits, filename)

    def transcription_budget(self, seconds: float) -> int:
        s = self.settings
        return int(s.transcription_min_tokens + s.transcription_tokens_per_audio_s * seconds)

    async def start_transcription(
        self,
        audio: np.ndarray,
        options: TranscriptionOptions,
        *,
        stream: bool = False,
        reservation: Reservation | None = None,
        record: RequestRecord | None = None,
    ) -> TranscriptionRun:
        """Prepare every piece off the loop, then queue them all at once (in `reservation`'s place, if
        given) so they run as rows of the same batches; if the queue refuses one, none is queued."""
        # The speech detector costs ~1% of the audio's length in CPU: never on the event loop.
        pieces = (
            whole(audio)
            if options.chunking is None
            else await self.off_loop(split_at_silences, audio, options.chunking)
        )
        requests = await asyncio.gather(*(self._piece_request(audio[p.start : p.end], options) for p in pieces))
        run = TranscriptionRun(options, audio.shape[0] / SAMPLE_RATE, pieces, [])
        run.items.extend(self.engine.submit_many(list(requests), stream=stream, reservation=reservation))
        if record is not None:
            record.add_items(run.items, self.runtime.text)
        log.debug("transcription of %.1f s queued as %d piece(s)", run.duration_s, len(pieces))
        return run

    async def finish_transcription(self, run: TranscriptionRun) -> Transcript:
        try:
            results = [await self.engine.wait(item) for item in run.items]
        finally:
            run.cancel()
        return run.transcript(
            [self._piece_result(p, r, run.options.include_logprobs) for p, r in zip(run.pieces, results, strict=True)]
        )

    async def stream_transcription(self, run: TranscriptionRun) -> AsyncIterator[Delta | Transcript]:
        """Text deltas in order (with their tokens' log-probs when asked), then the Transcript: the piece in
        front token by token, later pieces (decoded in the same batches meanwhile) as soon as those before
        them are done."""
        joiner, results = TextJoiner(), []
        asked = run.options.include_logprobs
        try:
            for piece, item in zip(run.pieces, run.items, strict=True):
                decoder = IncrementalDecoder.from_bytes(self.runtime.text_bytes)
                scores = TextLogprobs(self.constrainer.vocab) if asked else None
                async for event in self.engine.stream(item):
                    text = joiner.add(decoder.push(event.token_ids))
                    if scores is not None:
                        scores.add(event.logprobs or [])
                    yield text, scores.release(final=False) if scores is not None else None
                text = joiner.add(decoder.flush()) + joiner.end_piece()
                yield text, scores.release(final=True) if scores is not None else None
                assert item.result is not None
                results.append(self._piece_result(piece, item.result, asked))
        finally:
            run.cancel()
        yield run.transcript(results)

    async def _piece_request(self, audio: np.ndarray, options: TranscriptionOptions) -> PreparedRequest:
        if options.task == "translate":
            encoded = await self.off_loop(self.prompter.translation, audio, options.prompt)
        else:
            encoded = await self.off_loop(self.prompter.transcription, audio, options.language)
        room = self.settings.context_length - len(encoded.input_ids)
        if room <= 0:
            raise ContextLengthExceeded(
                f"The audio takes {len(encoded.input_ids)} prompt tokens; this model's maximum context length is "
                f"{self.settings.context_length}. Use chunking_strategy=auto to transcribe it in pieces.",
                param="file",
            )
        budget = min(self.transcription_budget(audio.shape[0] / SAMPLE_RATE), room)
        logprobs = 0 if options.logprobs else None
        sampling = SamplingParams(temperature=options.temperature, max_new_tokens=budget, logprobs=logprobs)
        return self._prepared(encoded, sampling, "translation" if options.task == "translate" else "transcription")

    def _piece_result(self, piece: Piece, result: GenerationResult, include_logprobs: bool) -> PieceResult:
        raw = self.runtime.text(result.token_ids)
        text, language = split_language(raw) or ("", None)
        scores = result.logprobs or []
        shown = text_logprobs(self.constrainer.vocab, scores) if include_logprobs else None
        return PieceResult(
            piece.start_s,
            piece.end_s,
            text.strip(),
            result.token_ids,
            result.prompt_tokens,
            language,
            shown,
            mean(scores),
        )

    # -- chat ------------------------------------------------------------------------------------
    async def prepare_chat(self, body: ChatCompletionRequest, record: RequestRecord | None = None) -> ChatJob:
        self.check_model(body.model)
        chat.check_unsupported(body, self.settings.max_batch_size)
        spec = chat.output_spec(body)
        messages = [await self._message(m, record) for m in body.messages]
        chat.check_chat_audio(messages, self.settings)
        encoded = await self.off_loop(self.prompter.chat, messages, chat.prompt_tools(body))
        sampling = chat.chat_sampling(body, len(encoded.input_ids), self.settings)
        prepared = self._prepared(encoded, sampling, "chat")
        prepared.constraint_factory = await self.off_loop(self._constraint, spec)
        if prepared.constraint_factory is not None:
            shortest = await self.off_loop(self.constrainer.shortest, spec)
            if shortest is not None and sampling.max_new_tokens < shortest:
                raise chat.minimum_refused(sampling.max_new_tokens, shortest)
        return ChatJob(prepared, self.constrainer.vocab, chat.tool_names(spec))

    def submit_chat(
        self, job: ChatJob, *, stream: bool, reservation: Reservation | None, record: RequestRecord | None
    ) -> WorkItem:
        item = self.engine.submit(job.prepared, stream=stream, reservation=reservation)
        if record is not None:
            record.add_items([item], self.runtime.text)
        return item

    @property
    def constrainer(self) -> Constrainer:
        return self.runtime.constrainer

    def _constraint(self, spec: OutputSpec) -> Callable[[], Constraint] | None:
        try:
            return self.constrainer.factory(spec)
        except GrammarError as exc:
            raise chat.grammar_refused(spec, exc) from exc

    def _prepared(self, encoded: Encoded, sampling: SamplingParams, kind: Any) -> PreparedRequest:
        return PreparedRequest(encoded.input_ids, encoded.audios, sampling, kind)

    async def _message(self, message: Message, record: RequestRecord | None) -> dict[str, Any]:
        out = chat.message_fields(message)
        if isinstance(message.content, list):
            out["content"] = [await self._part(p, record) for p in message.content]
        return out

    async def _part(self, part: Any, record: RequestRecord | None) -> dict[str, Any]:
        if isinstance(part, InputAudioPart):
            raw = part.input_audio if isinstance(part.input_audio, str) else part.input_audio.data
            unpack = partial(chat.b64_audio, raw)
        elif isinstance(part, AudioUrlPart):
            url = part.audio_url if isinstance(part.audio_url, str) else part.audio_url.url
            unpack = partial(chat.data_url_audio, url)
        else:
            return {"type": "text", "text": part.text}
        audio = await self.load_audio(unpack, None, self.settings.max_chat_audio_s, record)
        return {"type": "input_audio", "audio": audio}
