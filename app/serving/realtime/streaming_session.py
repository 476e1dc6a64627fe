"""A transcription session over a Voxtral Realtime model: text while the speaker is still talking.

The same commands, VAD and events as `Session`, but an utterance is a stream fed as its audio arrives
(`Streamer`): with `turn_detection: null` it begins at the first audio after a commit (or the session's
start) and ends at the client's commit; with server_vad / semantic_vad it begins at speech_started (the
prefix padding included) and ends at speech_stopped. Its item id is known when it begins, so its `.delta`
events flow before `input_audio_buffer.committed`; `.completed` follows the commit once the model's
right-padding flush has run out. Fed audio is not kept (semantic_vad keeps the utterance's last
--realtime-max-utterance-s for its turn-end model), and an utterance has no length limit: the model's
caches are windows of fixed size.
"""

from __future__ import annotations

from app.audio import SAMPLE_RATE
from app.errors import InvalidRequest, VoxtralError
from app.serving.realtime import events as ev
from app.serving.realtime.commands import AppendAudio, UpdateSession
from app.serving.realtime.config import TranscriptionSettings
from app.serving.realtime.events import Emit, new_id
from app.serving.realtime.session import MIN_COMMIT_S, Session, Shared, _gone, _ms
from app.serving.realtime.streamer import Streamer
from app.serving.realtime.turns import AudioBuffer


class StreamingSession(Session):
    def __init__(self, shared: Shared, emit: Emit) -> None:
        assert shared.streams is not None
        self._setup(shared, emit)
        self.streamer = Streamer(shared.streams, emit, shared.metrics, shared.blank_speech_s, self.id)
        self.fed = 0
        """Session position up to which the current utterance's audio went to its stream."""

    @property
    def unanswered(self) -> int:
        """Utterances committed and not yet answered; the one still being fed is not one (else a client that
        falls silent mid-utterance would never be idle)."""
        return self.streamer.unanswered - (self.streamer.current is not None)

    async def _update(self, command: UpdateSession) -> None:
        if isinstance(command.settings.transcription, TranscriptionSettings):
            self._check_delay(command.settings.transcription.delay)
        await super()._update(command)

    def _check_delay(self, delay: str | int | None) -> None:
        assert self.shared.streams is not None
        try:
            self.shared.streams.check_delay(delay)
        except VoxtralError as exc:
            exc.param = "session.audio.input.transcription.delay"
            raise

    async def _append(self, command: AppendAudio) -> None:
        if self.config.turn_detection is not None:
            await super()._append(command)  # the turns call `_started` / `_stop_and_commit` below
        else:
            self._check_room(command.audio)
            self.buffer.append(await self._decode(command.audio))
            if self.utterance is None:
                await self._started(self.buffer.start, announce=False)
        self._feed(self.buffer.end)

    def _feed(self, upto: int) -> None:
        """Send the current utterance's audio up to `upto` to its stream, and forget what no one needs."""
        if self.utterance is None:
            return
        if upto > self.fed:
            self.streamer.feed(self.buffer.peek(self.fed, upto))
            self.fed = upto
        keep = self.fed if self.config.turn_detection is None else self.buffer.end - self._max_samples
        self.buffer.drop_before(keep)

    async def _started(self, start: int, announce: bool = True) -> None:
        item = new_id("item")
        vad = self.config.turn_detection is not None
        self.streamer.begin(item, self.config.delay, speech=vad)
        self.utterance, self.fed = (item, start), start
        if announce:
            await self.emit(ev.SpeechStarted(item, _ms(start)))

    async def _stop_and_commit(self, at: int) -> None:
        assert self.utterance is not None
        item = self.utterance[0]
        self._feed(at)
        self.utterance = None
        await self.emit(ev.SpeechStopped(item, _ms(at)))
        await self._committed(item)

    async def _cut_if_too_long(self) -> None:
        """A stream has no length limit: nothing to cut."""

    async def _committed(self, item: str) -> None:
        await self.emit(ev.Committed(item, self.last_item))
        self.last_item = item
        self.streamer.end()

    async def _commit_by_hand(self) -> None:
        if self.config.turn_detection is None:
            self.buffer.append(await self._flush())
            self._feed(self.buffer.end)
        if self.utterance is None or self.buffer.end - self.utterance[1] < MIN_COMMIT_S * SAMPLE_RATE:
            held = 0 if self.utterance is None else self.buffer.end - self.utterance[1]
            raise InvalidRequest(
                f"Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but "
                f"buffer only has {_ms(max(0, held))}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        item = self.utterance[0]
        self._feed(self.buffer.end)
        self.utterance = None
        self.detector.restart(speaking=False)
        self.buffer.clear()
        await self._committed(item)

    async def _clear(self) -> None:
        self.streamer.drop()
        await super()._clear()

    async def close(self, *, flush: bool) -> None:
        if flush and self.utterance is not None and self.buffer.end - self.utterance[1] >= MIN_COMMIT_S * SAMPLE_RATE:
            if self.config.turn_detection is None:
                await self._committed(self.utterance[0])
                self.utterance = None
            else:
                await self._stop_and_commit(self.buffer.end)
        if flush:
            await self.streamer.finish()
        else:
            self.streamer.cancel()

    def cancel(self) -> None:
        self.streamer.cancel()

    def release(self) -> None:
        self.buffer = AudioBuffer()
        self._held, self.denoiser = None, None
        self.emit = _gone
        self.streamer.cancel()
        self.streamer.release()
