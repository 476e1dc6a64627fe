"""One transcription session's state machine: typed commands in, typed events out (through `emit`).

It owns the input decoder, the speech detector's stream, the uncommitted audio and its utterance sink
(app/serving/realtime/sink.py): a `Transcriber` (each committed turn transcribed whole) or, over a Voxtral
Realtime model, a `Streamer` (an utterance is a stream fed as its audio arrives, from its first audio with
`turn_detection: null` or from speech_started with VAD; its deltas come before its `committed`; fed audio is
not kept, except semantic_vad's last --realtime-max-utterance-s for its turn-end model; no length limit).
The speech detector runs in a prep thread, batched with the other sessions' (`SharedDetector`), and so
does semantic_vad's turn-end model (`SharedTurnEnd`); large appends are decoded there too. With
`noise_reduction` on, every append is decoded and denoised (`app.denoise.Denoiser`, the session's own
stream) in a prep thread, before the detector and the buffer see it: the denoiser holds back at most
32 ms, and keeps the timeline (its output sample `i` is input sample `i`). A session handles one command
at a time, so its events keep their order.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from dataclasses import dataclass

import numpy as np

from app.audio import SAMPLE_RATE
from app.audio_formats import InputDecoder
from app.denoise import Denoiser
from app.engine.fairness import part_of
from app.errors import AudioTooLong, InternalError, InvalidRequest, VoxtralError
from app.metrics import Metrics
from app.refusals import Refusals
from app.serving.prep import Prep
from app.serving.realtime import events as ev
from app.serving.realtime.commands import AppendAudio, Command, Commit, UpdateSession
from app.serving.realtime.config import SessionConfig
from app.serving.realtime.detector import SharedDetector, SharedTurnEnd
from app.serving.realtime.events import ConnectionGone, Emit, new_id
from app.serving.realtime.sink import Sink
from app.serving.realtime.streamer import Streamer
from app.serving.realtime.streams import StreamLoop
from app.serving.realtime.transcriber import Share, Transcriber
from app.serving.realtime.turns import COMPLETE, AudioBuffer, SemanticTurns, Turn, detector
from app.serving.transcription import TranscriptionServing
from app.serving.transcripts import TranscriptionOptions, check_language
from app.vad import VadStream

log = logging.getLogger(__name__)
MIN_COMMIT_S = 0.1
"""OpenAI refuses to commit less than 100 ms of audio."""
INLINE_BASE64 = 64 * 1024
"""Appends up to this much base64 (~0.5 s of 24 kHz PCM) are decoded on the event loop, where they cost
less than a thread hop; bigger ones in a prep thread (docs/PERF.md#audio-and-vad)."""


@dataclass(frozen=True)
class Shared:
    """What every session of the app uses: prep threads, the speech detector, the transcription path."""

    prep: Prep
    detector: SharedDetector
    transcriptions: TranscriptionServing | None
    """None with a Voxtral Realtime model (`streams`)."""
    metrics: Metrics
    model: str
    """A new session's model (the served model id)."""
    max_utterance_s: float
    max_pending_utterances: int
    refusals: Refusals
    max_buffer_s: float
    """Most uncommitted audio a session holds; an append past it is refused before it is decoded."""
    turn_end: SharedTurnEnd
    streams: StreamLoop | None = None
    """A Voxtral Realtime model's ticking loop: sessions stream (`Streamer`); None: turns are
    transcribed whole."""
    blank_speech_s: float = 10.0
    max_session_s: float = 3600.0
    """--realtime-max-session-s: a session's `expires_at`."""


class Session:
    """One session; how its utterances are answered is its `sink` (whole turns through the engine, or streams
    over a Voxtral Realtime model). Invariant: `utterance` is set exactly while the sink has an utterance open
    (every change goes through `_started`, `_end` and `_drop`)."""

    def __init__(self, shared: Shared, emit: Emit, client: str = "") -> None:
        """`client`: the opaque key of the client (an API key's hash, an address): its sessions share its
        places in the queue, and are served round-robin among themselves (app/engine/fairness.py)."""
        self.shared, self.emit = shared, emit
        self.id = new_id("sess")
        self.expires_at = int(time.time() + shared.max_session_s)
        self.config = SessionConfig(model=shared.model)
        self.buffer = AudioBuffer()
        self.decoder = InputDecoder(self.config.format)
        self.stream = VadStream()
        self.detector = detector(self.config.turn_detection)
        self.denoiser: Denoiser | None = None
        self._held: np.ndarray | None = None  # a denoiser's last output, when noise reduction was turned off
        self.utterance: tuple[str, int] | None = None  # (item id, start sample) while an utterance is open
        self.fed = 0
        """Session position up to which the open utterance's audio went to a streaming sink."""
        self.last_item: str | None = None
        self.sink: Sink = self._sink(client)

    def _sink(self, client: str) -> Sink:
        shared = self.shared
        if shared.streams is not None:
            return Streamer(shared.streams, self.emit, shared.metrics, shared.blank_speech_s, self.id)
        assert shared.transcriptions is not None
        share = Share(part_of(client, self.id), shared.max_pending_utterances, shared.refusals)
        return Transcriber(shared.transcriptions, self.emit, shared.metrics, share)

    @property
    def unanswered(self) -> int:
        """Utterances committed and not yet answered: a session waiting for them is not idle."""
        return self.sink.unanswered

    async def start(self) -> None:
        await self.emit(ev.SessionCreated(self.id, self.config, self.expires_at))

    async def handle(self, command: Command) -> None:
        """One command; a refused one is answered with an `Error` event naming it."""
        try:
            await self._dispatch(command)
        except VoxtralError as exc:
            await self.emit(ev.Error(exc, command.event_id))
        except ConnectionGone:
            raise
        except Exception:  # a bug must not drop the socket: say so, and go on
            log.exception("realtime session %s failed on a %s command", self.id, type(command).__name__)
            await self.emit(ev.Error(InternalError("The server had an internal error."), command.event_id))

    async def _dispatch(self, command: Command) -> None:
        if isinstance(command, UpdateSession):
            await self._update(command)
        elif isinstance(command, AppendAudio):
            await self._append(command)
        elif isinstance(command, Commit):
            await self._commit_by_hand()
        else:
            await self._clear()

    async def _clear(self) -> None:
        self._drop()
        self.buffer.clear()
        self.detector.restart(speaking=False)
        await self.emit(ev.Cleared())

    async def _update(self, command: UpdateSession) -> None:
        config = self.config.updated(command.settings, self._check_transcription)
        self.sink.accepts(config)
        if config.format != self.config.format:
            self.decoder = InputDecoder(config.format)
        position = self.detector.position
        vad, was_vad = config.turn_detection is not None, self.config.turn_detection is not None
        if vad and not was_vad:
            self.stream, position = VadStream(), self.buffer.end  # the detector was not fed meanwhile
            self._drop()  # a manual utterance in progress: the detector decides where the next one starts
        elif was_vad and not vad and not self.sink.streaming:
            self._drop()  # manual commits from now on: the buffer keeps what was said
        await self._denoise_as(config)
        self.config = config
        self.detector = detector(config.turn_detection, position)
        if vad and self.utterance is not None:  # speech goes on under the new settings
            self.detector.restart(speaking=True)
        await self.emit(ev.SessionUpdated(self.id, config, self.expires_at))

    async def _denoise_as(self, config: SessionConfig) -> None:
        """Start, retune or stop the denoiser; what a stopped one held comes before the next append's audio."""
        kind = config.noise_reduction
        if kind is not None and self.denoiser is not None:
            self.denoiser.kind = kind
        elif kind is not None:
            self.denoiser = Denoiser(kind)
        elif self.denoiser is not None:
            self._held = await self.shared.prep.run(self.denoiser.flush)
            self.denoiser = None

    def _check_transcription(self, model: str | None, language: str | None) -> str | None:
        try:
            self.shared.prep.check_model(model)
            return check_language(language)
        except VoxtralError as exc:
            exc.param = f"session.audio.input.transcription.{exc.param}"
            raise

    async def _append(self, command: AppendAudio) -> None:
        self._check_room(command.audio)
        samples = await self._decode(command.audio)
        self.buffer.append(samples)
        if self.config.turn_detection is None:
            await self._manual()
            return
        probs = await self.shared.detector.push(self.stream, samples)
        turns = self.detector.feed(probs)
        while turns:
            turn = turns.pop(0)
            if turn.kind == "pause":  # semantic_vad: the turn-end model decides; later windows wait for it
                turns = await self._pause(turn)
            else:
                await self._turn(turn)
        await self._cut_if_too_long()
        if self.utterance is None:  # idle: keep only what a coming utterance's prefix padding needs
            self.buffer.drop_before(self.detector.position - self._prefix_samples)
        self._feed(self.buffer.end)

    async def _manual(self) -> None:
        """After a manual-mode append: a streaming sink's utterance opens at its first audio and takes it as it
        comes; a whole-turn one is committed in pieces of --realtime-max-utterance-s."""
        if self.sink.streaming:
            if self.utterance is None:
                await self._started(self.buffer.start, announce=False)
            self._feed(self.buffer.end)
            return
        while self.buffer.end - self.buffer.start >= self._max_samples:  # one big append may hold several
            start = self.buffer.start
            await self._commit(self.buffer.take(start, start + self._max_samples))

    def _feed(self, upto: int) -> None:
        """Send the open utterance's audio up to `upto` to a streaming sink, and forget what no one needs (the
        utterance's last --realtime-max-utterance-s stay for semantic_vad's turn-end model)."""
        if not self.sink.streaming or self.utterance is None:
            return
        if upto > self.fed:
            self.sink.feed(self.buffer.peek(self.fed, upto))
            self.fed = upto
        keep = self.fed if self.config.turn_detection is None else self.buffer.end - self._max_samples
        self.buffer.drop_before(keep)

    def _check_room(self, audio: str) -> None:
        """Refuse an append that would take the uncommitted audio past `max_buffer_s`, from its base64 length."""
        incoming = self.decoder.seconds_in(len(audio) * 3 // 4)
        held = (self.buffer.end - self.buffer.start) / SAMPLE_RATE
        if held + incoming > self.shared.max_buffer_s:
            raise AudioTooLong(
                f"This append holds {incoming:.1f} s of audio and the input audio buffer {held:.1f} s; a session "
                f"buffers at most {self.shared.max_buffer_s:g} s of uncommitted audio. Send smaller appends.",
                param="audio",
            )

    async def _decode(self, audio: str) -> np.ndarray:
        if self.denoiser is not None:
            samples = await self.shared.prep.run(self._ingest_denoised, audio, self.denoiser)
        elif len(audio) <= INLINE_BASE64:  # a usual 20-100 ms chunk: cheaper here than a hop to a thread
            samples = self._ingest(audio)
        else:
            samples = await self.shared.prep.run(self._ingest, audio)
        if self._held is not None:
            samples, self._held = np.concatenate([self._held, samples]), None
        return samples

    def _ingest_denoised(self, audio: str, denoiser: Denoiser) -> np.ndarray:
        return denoiser.push(self._ingest(audio))

    def _ingest(self, audio: str) -> np.ndarray:
        """base64 -> 16 kHz samples."""
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("audio is not valid base64.", param="audio", code="invalid_value") from None
        return self.decoder.push(raw)

    async def _flush(self) -> np.ndarray:
        """What the decoder and the denoiser hold, for a manual commit (the denoiser then starts afresh)."""
        tail = self.decoder.flush()
        if self._held is not None:
            tail, self._held = np.concatenate([self._held, tail]), None
        if self.denoiser is None:
            return tail
        denoiser = self.denoiser
        return await self.shared.prep.run(lambda: np.concatenate([denoiser.push(tail), denoiser.flush()]))

    async def _turn(self, turn: Turn) -> None:
        if turn.kind == "start":
            await self._started(max(self.buffer.start, turn.at - self._prefix_samples))
        elif self.utterance is not None:
            await self._stop_and_commit(turn.at)

    async def _pause(self, pause: Turn) -> list[Turn]:
        """Ask the turn-end model about the utterance up to `pause`; end the turn there if it is complete."""
        assert isinstance(self.detector, SemanticTurns)
        complete = self.utterance is None
        if self.utterance is not None:
            audio = self.buffer.peek(self.utterance[1], pause.at)
            try:
                complete = await self.shared.turn_end.complete(audio) >= COMPLETE
            except Exception:  # the model failed: the pause ends the turn, as a plain VAD's would
                log.exception("realtime session %s: the turn-end model failed", self.id)
                complete = True
            if complete:
                await self._stop_and_commit(pause.at)
        return self.detector.decided(pause, complete)

    async def _started(self, start: int, announce: bool = True) -> None:
        """Open an utterance at `start` (any open one is dropped first: the sink holds one at a time)."""
        self._drop()
        item = new_id("item")
        self.sink.begin(item, self.config, speech=self.config.turn_detection is not None)
        self.utterance, self.fed = (item, start), start
        if announce:
            await self.emit(ev.SpeechStarted(item, _ms(start)))

    async def _stop_and_commit(self, at: int) -> None:
        await self._end(at, stopped=True)

    async def _end(self, at: int, stopped: bool = False) -> None:
        """Commit the open utterance's audio up to `at` (`stopped`: speech_stopped comes first)."""
        assert self.utterance is not None
        item, start = self.utterance
        self._feed(at)
        self.utterance = None
        if stopped:
            await self.emit(ev.SpeechStopped(item, _ms(at)))
        await self._commit(self.buffer.take(start, at), item)

    def _drop(self) -> None:
        """Abandon the open utterance, if any: its sink sends nothing for it (the buffer keeps its audio)."""
        if self.utterance is not None:
            self.utterance = None
            self.sink.drop()

    async def _cut_if_too_long(self) -> None:
        """An utterance reaching the limit is committed where it is; speech going on starts the next one (a
        streaming sink's utterance has no limit: the model's caches are windows of fixed size)."""
        while (
            not self.sink.streaming
            and self.utterance is not None
            and self.detector.position - self.utterance[1] >= self._max_samples
        ):
            at = self.utterance[1] + self._max_samples
            await self._stop_and_commit(at)
            self.detector.restart(speaking=True)
            await self._started(at)

    async def _commit_by_hand(self) -> None:
        if self.config.turn_detection is None:  # (with VAD the stream goes on; its next samples stay in line)
            self.buffer.append(await self._flush())
        start = self.utterance[1] if self.utterance is not None else self.buffer.start
        if self.buffer.end - start < MIN_COMMIT_S * SAMPLE_RATE:
            raise InvalidRequest(
                f"Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but "
                f"buffer only has {_ms(max(0, self.buffer.end - start))}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        if self.utterance is None:  # what the buffer holds becomes the utterance (a stream opens for it now)
            await self._started(start, announce=False)
        self.detector.restart(speaking=False)
        await self._end(self.buffer.end)

    async def _commit(self, audio: np.ndarray, item_id: str | None = None) -> None:
        item = item_id or new_id("item")
        await self.emit(ev.Committed(item, self.last_item))
        self.last_item = item
        logprobs = self.config.logprobs
        options = TranscriptionOptions(
            "transcribe", self.config.language, self.config.prompt, logprobs=logprobs, include_logprobs=logprobs
        )
        self.sink.commit(item, audio, options)

    async def close(self, *, flush: bool) -> None:
        """`flush` (idle, drain, session limit): commit the open utterance when it holds at least 100 ms (after
        speech_stopped with VAD), drop it when shorter, and deliver every committed one; else drop them all. So
        a `.completed` always follows its `committed`, and no stream is left open."""
        if flush and self.utterance is not None and self._held_s(self.utterance[1]) >= MIN_COMMIT_S:
            await self._end(self.buffer.end, stopped=self.config.turn_detection is not None)
        self._drop()
        if flush:
            await self.sink.finish()
        else:
            self.sink.cancel()

    def cancel(self) -> None:
        """The client is gone: stop answering its utterances."""
        self.sink.cancel()

    def release(self) -> None:
        """The session has ended (after `close` or `cancel`): free its audio now, and let go of the connection
        (`emit`), which holds this session: a reference cycle would keep both, and the uncommitted audio (up to
        --realtime-max-buffer-s), until the garbage collector's next full pass."""
        self.buffer = AudioBuffer()
        self._held, self.denoiser = None, None
        self.emit = _gone
        self.sink.release()

    @property
    def _prefix_samples(self) -> int:
        vad = self.config.turn_detection
        return int((vad.prefix_padding_ms if vad else 0) * SAMPLE_RATE / 1000)

    def _held_s(self, start: int) -> float:
        return (self.buffer.end - start) / SAMPLE_RATE

    @property
    def _max_samples(self) -> int:
        return int(self.shared.max_utterance_s * SAMPLE_RATE)


async def _gone(event: ev.Event) -> None:
    raise ConnectionGone


def _ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE
