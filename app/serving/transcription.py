"""The transcription and translation use case: admit, read and decode the upload, cut it at silences,
prepare every piece, queue them as rows of the same batches, then answer whole (`Transcript`) or as
text deltas. Realtime utterances take the same path from already decoded audio.

Everything that can be refused is refused before the queue, so the worker only sees requests it can run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from app.audio import SAMPLE_RATE
from app.chunking import Piece, split_at_silences, whole
from app.config import Settings
from app.engine.engine import Engine, Reservation
from app.engine.ticket import Ticket
from app.errors import ContextLengthExceeded, VoxtralError
from app.model.runtime import ModelRuntime
from app.serving import transcription_request
from app.serving.logprobs import mean
from app.serving.prep import Prep, Read
from app.serving.record import RequestRecord
from app.serving.transcript_logprobs import TextLogprobs, text_logprobs
from app.serving.transcription_request import AudioForm
from app.serving.transcripts import (
    PieceResult,
    Task,
    TextJoiner,
    Transcript,
    TranscriptDelta,
    TranscriptionOptions,
    split_language,
)
from app.types import GenerationResult, PreparedRequest, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    read: Read
    filename: str | None


@dataclass
class TranscriptionRun:
    """The pieces of one transcription, queued in the engine: wait for its `result()` or stream its
    `deltas()`; `cancel()` stops the pieces still running (client gone, a piece failed, timeout)."""

    runtime: ModelRuntime
    options: TranscriptionOptions
    duration_s: float
    pieces: list[Piece]
    tickets: list[Ticket]

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()  # a no-op for finished pieces

    async def result(self) -> Transcript:
        try:
            results = [await ticket.result() for ticket in self.tickets]
        finally:
            self.cancel()
        return self._transcript([self._piece(p, r) for p, r in zip(self.pieces, results, strict=True)])

    async def deltas(self) -> AsyncIterator[TranscriptDelta | Transcript]:
        """Text deltas in order (with their tokens' log-probs when asked), then the Transcript: the piece in
        front token by token, later pieces (decoded in the same batches meanwhile) as soon as those before
        them are done."""
        joiner, results = TextJoiner(), []
        try:
            for piece, ticket in zip(self.pieces, self.tickets, strict=True):
                decoder = self.runtime.decoder()
                scores = TextLogprobs(self.runtime.vocab) if self.options.include_logprobs else None
                async for event in ticket.events():
                    if scores is not None:
                        scores.add(event.logprobs or [])
                    yield _delta(joiner.add(decoder.push(event.token_ids)), scores, final=False)
                yield _delta(joiner.add(decoder.flush()) + joiner.end_piece(), scores, final=True)
                assert ticket.final is not None
                results.append(self._piece(piece, ticket.final))
        finally:
            self.cancel()
        yield self._transcript(results)

    def _transcript(self, results: list[PieceResult]) -> Transcript:
        return Transcript(self.options, self.duration_s, results)

    def _piece(self, piece: Piece, result: GenerationResult) -> PieceResult:
        text, language = split_language(self.runtime.text(result.token_ids)) or ("", None)
        scores = result.logprobs or []
        shown = text_logprobs(self.runtime.vocab, scores) if self.options.include_logprobs else None
        args = (piece.start_s, piece.end_s, text.strip(), result.token_ids, result.prompt_tokens, language)
        return PieceResult(*args, shown, mean(scores))


def _delta(text: str, scores: TextLogprobs | None, final: bool) -> TranscriptDelta:
    return TranscriptDelta(text, scores.release(final=final) if scores is not None else None)


class TranscriptionServing:
    def __init__(self, settings: Settings, runtime: ModelRuntime, prep: Prep, engine: Engine) -> None:
        self.settings, self.runtime, self.prep, self.engine = settings, runtime, prep, engine

    async def transcribe(
        self, form: AudioForm, upload: Upload, task: Task, record: RequestRecord | None, owner: str = ""
    ) -> TranscriptionRun:
        """A file upload: the request is checked, then a queue place held while the file is read and
        decoded (a full queue, or `owner` past its share, refuses before any of that work)."""
        self.prep.check_model(form.model)
        options = transcription_request.options(form, task)
        with self.engine.admission(owner) as reservation:
            raw = await self.prep.read_upload(upload.read)
            try:  # the header's length is checked before a sample is decoded (app/audio.py)
                audio = await self.prep.audio(raw, upload.filename, self.settings.max_transcription_audio_s, record)
            except VoxtralError as exc:
                exc.param = exc.param or "file"
                raise
            return await self.start(audio, options, stream=form.stream, reservation=reservation, record=record)

    async def utterance(self, audio: np.ndarray, options: TranscriptionOptions, owner: str = "") -> TranscriptionRun:
        """A realtime utterance of session `owner`, streamed. A full queue refuses before the audio is prepared."""
        with self.engine.admission(owner) as reservation:
            return await self.start(audio, options, stream=True, reservation=reservation)

    async def start(
        self,
        audio: np.ndarray,
        options: TranscriptionOptions,
        *,
        stream: bool,
        reservation: Reservation,
        record: RequestRecord | None = None,
    ) -> TranscriptionRun:
        """Prepare every piece off the loop, then queue them all at once in `reservation`'s place so they
        run as rows of the same batches; if the queue refuses one, none is queued."""
        # The speech detector's CPU time grows with the audio (docs/PERF.md): never on the event loop.
        chunks = options.chunking
        pieces = whole(audio) if chunks is None else await self.prep.run(split_at_silences, audio, chunks)
        requests = await asyncio.gather(*(self._request(audio[p.start : p.end], options) for p in pieces))
        tickets = self.engine.submit_many(list(requests), stream=stream, reservation=reservation)
        if record is not None:
            record.add_tickets(tickets, self.runtime.text)
        duration = audio.shape[0] / SAMPLE_RATE
        log.debug("transcription of %.1f s queued as %d piece(s)", duration, len(pieces))
        return TranscriptionRun(self.runtime, options, duration, pieces, tickets)

    async def _request(self, audio: np.ndarray, options: TranscriptionOptions) -> PreparedRequest:
        prompter, settings = self.runtime.prompter, self.settings
        if options.task == "translate":
            encoded = await self.prep.run(prompter.translation, audio, options.prompt)
        else:
            encoded = await self.prep.run(prompter.transcription, audio, options.language)
        room = settings.context_length - len(encoded.input_ids)
        if room <= 0:
            raise ContextLengthExceeded(
                f"The audio takes {len(encoded.input_ids)} prompt tokens; this model's maximum context length is "
                f"{settings.context_length}. Use chunking_strategy=auto to transcribe it in pieces.",
                param="file",
            )
        seconds = audio.shape[0] / SAMPLE_RATE
        budget = min(int(settings.transcription_min_tokens + settings.transcription_tokens_per_audio_s * seconds), room)
        sampling = SamplingParams(
            temperature=options.temperature, max_new_tokens=budget, logprobs=0 if options.logprobs else None
        )
        if options.task == "translate":
            return PreparedRequest(encoded.input_ids, encoded.audios, sampling, "translation")
        return PreparedRequest(encoded.input_ids, encoded.audios, sampling, "transcription")
