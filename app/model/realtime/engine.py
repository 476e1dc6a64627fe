"""Streams in, tokens out: the realtime engine's state machine over `RealtimeForward` (contract: the package
docstring, app/model/realtime/__init__.py)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.model.compute.slots import batch_sizes, padded
from app.model.compute.transfer import bind_thread, upload
from app.model.realtime.forward import RealtimeForward, Rows
from app.model.realtime.pool import StreamPool
from app.model.realtime.timing import FrameGeometry, delay_tokens
from app.model.text.detok import IncrementalDecoder


@dataclass(frozen=True)
class StreamStep:
    """One token a tick emitted for one stream.

    `frame`: the audio token-frame (80 ms, from 0 at the stream's first sample) whose forward emitted it: its
    audio ended at (frame + 1) * 80 ms, and it speaks for audio about `delay` frames earlier. `text`: the
    text this token completes (may be empty: special tokens, a character still incomplete). `final`: the last
    token of a flushed stream (its text then holds the decoder's remainder); the stream is finished."""

    stream: int
    token: int
    text: str
    frame: int
    final: bool


@dataclass(frozen=True)
class TickResult:
    """What one `tick` did: the steps in stream order, and the rows its forwards ran (padding included)."""

    steps: tuple[StreamStep, ...]
    rows: int
    padded_rows: int
    gathered: bool = False
    """Whether the steady forward gathered its rows' caches (their slots too scattered to read as one range)."""


@dataclass(frozen=True)
class _Layout:
    """A steady forward's rows: the slot each reads and the slot each writes, the row of each stepping stream
    (in slot order), and the range the reads form when it is one (a view of the caches, no gather)."""

    reads: list[int]
    writes: list[int]
    at: list[int]
    span: slice | None


@dataclass
class _Stream:
    slot: int
    delay: int
    decoder: IncrementalDecoder
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    base: int = 0
    """Absolute sample index (after the left pad) of pending[0]."""
    received: int = 0
    emitted: int = 0
    last_token: int = 0
    flushed_at: int | None = None
    """Samples received when flushed (the padding then follows); None while open to audio."""
    finished: bool = False


class RealtimeEngine:
    """Every open stream's state and the batched tick. One thread owns it (see the package docstring)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        max_streams: int,
        pieces: Sequence[bytes] | None = None,
        pad_batches: bool = True,
    ) -> None:
        self.model = model
        self.geometry = FrameGeometry.of(processor)
        self.default_delay_ms = int(processor.mistral_common_audio_config.transcription_delay_ms)
        self.pool = StreamPool.allocate(model, max_streams)
        self.forward = RealtimeForward(model, self.pool)
        self._extractor = processor.feature_extractor
        tokenizer = processor.tokenizer.tokenizer.instruct_tokenizer
        self._bos = int(tokenizer.tokenizer.bos_id)
        self._pad = int(tokenizer.audio_encoder.streaming_pad)
        self._pieces = pieces if pieces is not None else _pieces(tokenizer.tokenizer)
        self._sizes = batch_sizes(max_streams) if pad_batches else None
        self._streams: dict[int, _Stream] = {}
        self._free = list(range(max_streams))  # a heap: streams take the lowest free slot (see `_layout`)
        self._next_id = 0
        self._device = next(model.parameters()).device

    # -- the serving layer's calls ---------------------------------------------------------------------------

    def open(self, delay: str | int | None = None) -> int:
        """A new stream (an OpenAI delay name, milliseconds, or None for the checkpoint's default); its id.
        Raises ValueError on a bad delay, RuntimeError when every slot is taken."""
        tokens = delay_tokens(delay, self.default_delay_ms)
        if not self._free:
            raise RuntimeError(f"all {self.pool.slots} realtime stream slots are in use")
        slot = heapq.heappop(self._free)
        self.pool.reset(slot)
        stream_id, self._next_id = self._next_id, self._next_id + 1
        pieces = self._pieces  # not `self`: a stream's decoder holding its engine would keep the pool alive
        decoder = IncrementalDecoder.from_bytes(lambda ids: b"".join(pieces[i] for i in ids))
        self._streams[stream_id] = _Stream(slot, tokens, decoder)
        return stream_id

    def feed(self, stream: int, samples: np.ndarray) -> None:
        """Append float32 mono 16 kHz samples. Raises KeyError for an unknown stream, ValueError after flush."""
        state = self._streams[stream]
        if state.flushed_at is not None:
            raise ValueError(f"stream {stream} was flushed: open a new one for more audio")
        self._append(state, np.asarray(samples, dtype=np.float32).reshape(-1))

    def flush(self, stream: int) -> None:
        """End of speech (a commit): append the model's right padding (silence) so the next ticks decode every
        frame received, the last step marked `final`. Idempotent."""
        state = self._streams[stream]
        if state.flushed_at is not None:
            return
        state.flushed_at = state.received
        pad = self.geometry.flush_samples(state.received, state.delay)
        self._append(state, np.zeros(pad, dtype=np.float32))

    def close(self, stream: int) -> None:
        """Forget the stream and free its slot (at once: between ticks). Unknown ids are ignored."""
        state = self._streams.pop(stream, None)
        if state is not None:
            heapq.heappush(self._free, state.slot)

    def backlog(self, stream: int) -> int:
        """Tokens the stream's audio allows that no tick has emitted yet (1 while keeping up)."""
        return self._backlog(self._streams[stream])

    def held_samples(self, stream: int) -> int:
        """Audio samples the host keeps for the stream: at most one step's window and what came since the last
        tick while the ticks keep up."""
        return int(self._streams[stream].pending.shape[0])

    def ready(self) -> bool:
        """Whether a tick would step any stream."""
        return any(self._due(s) for s in self._streams.values())

    def lagging(self) -> bool:
        """Whether any stream has more than one token ready: it fell behind, or flushed (its padding is all
        there): the caller should not hold the next tick back."""
        return any(self._due(s) and self._backlog(s) > 1 for s in self._streams.values())

    def _backlog(self, state: _Stream) -> int:
        return self.geometry.tokens_ready(state.received, state.delay) - state.emitted

    @property
    def streams(self) -> int:
        return len(self._streams)

    def cache_bytes(self) -> int:
        """Bytes of every stream cache (allocated once at construction: constant)."""
        return self.pool.nbytes()

    def tick(self) -> TickResult:
        """Step every stream with a new token-frame: each a token. Streams at their first frame run a prompt
        forward (one per delay among them); all others run ONE forward of one token each."""
        bind_thread(self._device)
        due = sorted((sid for sid, s in self._streams.items() if self._due(s)), key=lambda sid: sid)
        first = [sid for sid in due if self._streams[sid].emitted == 0]
        steps = [sid for sid in due if self._streams[sid].emitted > 0]
        results: dict[int, StreamStep] = {}
        rows = padded_rows = 0
        for delay in sorted({self._streams[sid].delay for sid in first}):
            group = [sid for sid in first if self._streams[sid].delay == delay]
            results |= self._run(group, self._prompt_rows(group))
            rows += len(group)
            padded_rows += len(group)
        gathered = False
        if steps:
            steps.sort(key=lambda sid: self._streams[sid].slot)  # slot order: one contiguous range, commonly
            layout = self._layout([self._streams[sid].slot for sid in steps])
            results |= self._run(steps, self._step_rows(steps, layout), layout.at)
            rows += len(steps)
            padded_rows += len(layout.reads)
            gathered = layout.span is None
        return TickResult(tuple(results[sid] for sid in due), rows, padded_rows, gathered)

    # -- internals ------------------------------------------------------------------------------------------

    def _append(self, state: _Stream, samples: np.ndarray) -> None:
        state.pending = np.concatenate([state.pending, samples])
        state.received += samples.shape[0]

    def _due(self, state: _Stream) -> bool:
        return not state.finished and self.geometry.tokens_ready(state.received, state.delay) > state.emitted

    def _take(self, state: _Stream, start: int, length: int, next_start: int) -> np.ndarray:
        """Samples [start, start + length) (absolute), then drop what no later window reads."""
        chunk = state.pending[start - state.base : start - state.base + length]
        drop = next_start - state.base
        state.pending, state.base = state.pending[drop:], next_start
        return chunk

    def _prompt_rows(self, group: list[int]) -> Rows:
        g = self.geometry
        delay = self._streams[group[0]].delay
        left = np.zeros(g.left_pad_tokens * g.samples_per_token, dtype=np.float32)
        audio = []
        for sid in group:
            state = self._streams[sid]
            chunk = self._take(state, 0, g.first_samples(delay), g.window_start(delay, 1))
            audio.append(np.concatenate([left, chunk]))
        prompt = [self._bos] + [self._pad] * (g.prompt_tokens(delay) - 1)
        n = len(group)
        slots = [self._streams[sid].slot for sid in group]
        return self._rows(audio, True, slots, [prompt] * n, [0] * n, [0] * n, [delay] * n, None, fresh=True)

    def _step_rows(self, group: list[int], layout: _Layout) -> Rows:
        """The steady forward's rows: each stream of `group` (slot order) at its row of `layout`, the other rows
        filling the step (silence, token 0, position 0)."""
        g = self.geometry
        size = len(layout.reads)
        audio = [np.zeros(g.step_samples, dtype=np.float32)] * size
        tokens, seen, delays = [[0]] * size, [0] * size, [0] * size
        for sid, row in zip(group, layout.at, strict=True):
            state = self._streams[sid]
            start = g.window_start(state.delay, state.emitted)
            audio[row] = self._take(state, start, g.step_samples, start + g.samples_per_token)
            tokens[row] = [state.last_token]
            seen[row] = g.prompt_tokens(state.delay) + state.emitted - 1
            delays[row] = state.delay
        encoder_seen = [s * self.downsample_frames for s in seen]
        return self._rows(
            audio, False, layout.reads, tokens, encoder_seen, seen, delays, layout.span, writes=layout.writes
        )

    def _rows(
        self,
        audio: list[np.ndarray],
        center: bool,
        slots: list[int],
        tokens: list[list[int]],
        encoder_seen: list[int],
        decoder_seen: list[int],
        delays: list[int],
        span: slice | None,
        fresh: bool = False,
        writes: list[int] | None = None,
    ) -> Rows:
        """A forward's `Rows`: its integers uploaded in ONE pinned copy (views of it on the device), its
        features in another, so the host never waits on an upload. `writes`: the slot each row's state goes to
        (None: the slot it reads)."""
        n = len(slots)
        columns = [slots, encoder_seen, decoder_seen, delays, writes if writes is not None else slots]
        host = np.concatenate([np.asarray(columns, dtype=np.int64).reshape(-1),
                               np.asarray(tokens, dtype=np.int64).reshape(-1)])  # fmt: skip
        flat = upload(torch.from_numpy(host), self._device)
        return Rows(
            slots=flat[:n],
            features=self._log_mel(np.stack(audio), center=center),
            tokens=flat[5 * n :].view(n, -1),
            encoder_seen=flat[n : 2 * n],
            decoder_seen=flat[2 * n : 3 * n],
            delays=flat[3 * n : 4 * n],
            span=span,
            fresh=fresh,
            writes=flat[4 * n : 5 * n],
        )

    def _layout(self, slots: list[int]) -> _Layout:
        """Where the steady forward's rows read and write, for streams in `slots` (ascending).

        A forward reads its rows' caches as one view when their slots are one contiguous range, and otherwise
        gathers every row's whole rings (per layer: a copy written and read again, ~1 GiB a stream a tick at
        Voxtral-Mini-Realtime's windows). So the rows are the range of slots from the first stream's, padded to
        a batch size, when that is at most twice the rows the streams alone would be padded to (moved down so
        that it ends before the scratch slot): a row whose slot is not stepping (a stream with no new frame
        this tick, or a free slot) fills the step, reading its slot (its attention reads one ring, once, where a
        gather copies every stepping row's) and writing to the scratch slot (a stream's) or to its own (a free
        one: a stream that takes it starts with a fresh forward, which reads no ring). Otherwise the streams'
        slots are gathered, padded with the scratch slot. Without batch sizes (`pad_batches=False`) only a
        contiguous run of slots is read as a view."""
        first, count = slots[0], len(slots)
        scratch = self.pool.scratch
        spread = slots[-1] - first + 1
        size = padded(spread, self._sizes) if self._sizes else spread  # at most max_streams: the scratch slot's index
        if spread == count or (self._sizes is not None and size <= 2 * padded(count, self._sizes)):
            start = min(first, scratch - size)
            reads = list(range(start, start + size))
            stepping = set(slots)
            live = {state.slot for state in self._streams.values()}
            writes = [s if s in stepping or s not in live else scratch for s in reads]
            return _Layout(reads, writes, [s - start for s in slots], slice(start, start + size))
        size = padded(count, self._sizes) if self._sizes else count
        reads = slots + [scratch] * (size - count)
        return _Layout(reads, reads, list(range(count)), None)

    @property
    def downsample_frames(self) -> int:
        """Encoder frames a token (the projector's downsampling)."""
        return int(self.model.config.downsample_factor)

    def _run(self, group: list[int], rows: Rows, at: list[int] | None = None) -> dict[int, StreamStep]:
        """Run `rows`; emit for each stream of `group` the token of its row (`at`; None: the first rows)."""
        every = self.forward(rows).tolist()
        tokens = [every[i] for i in at] if at is not None else every[: len(group)]
        return {sid: self._emit(sid, int(token)) for sid, token in zip(group, tokens, strict=True)}

    def _emit(self, sid: int, token: int) -> StreamStep:
        state = self._streams[sid]
        frame = state.delay + state.emitted
        state.emitted += 1
        state.last_token = token
        text = state.decoder.push([token])
        final = state.flushed_at is not None and not self._due(state)
        if final:
            text += state.decoder.flush()
            state.finished = True
        return StreamStep(sid, token, text, frame, final)

    def _log_mel(self, audio: np.ndarray, center: bool) -> torch.Tensor:
        """[rows, mels, frames] as the processor computes it (float32 STFT), in the model's dtype."""
        waveform = torch.from_numpy(audio).to(torch.float32)
        features = self._extractor._torch_extract_fbank_features(waveform, "cpu", center)
        return upload(features.to(self.model.lm_head.weight.dtype), self._device)


def _pieces(tekken: Any) -> list[bytes]:
    """Each token id's bytes (special tokens: none), as app/model/text/vocabulary.py reads them."""
    n_special = tekken.num_special_tokens
    return [b"" if i < n_special else bytes(tekken.id_to_byte_piece(i)) for i in range(tekken.n_words)]
