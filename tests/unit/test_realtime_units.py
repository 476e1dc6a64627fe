"""Pure unit tests of the realtime pieces: G.711 tables, streaming input decoding, server-VAD turns on
given probabilities, and the uncommitted-audio buffer."""

from __future__ import annotations

import numpy as np
import pytest

from app import vad
from app.audio_formats import ALAW, ULAW, InputDecoder
from app.serving.realtime.config import SemanticVad, ServerVad
from app.serving.realtime.turns import START_WINDOWS, AudioBuffer, SemanticTurns, Turn, TurnDetector
from app.vad import WINDOW


def test_g711_tables_are_the_standards() -> None:
    audioop = pytest.importorskip("audioop")  # Python < 3.13 ships the reference decoder
    codes = bytes(range(256))
    assert np.array_equal(np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2") / 32768, ULAW)
    assert np.array_equal(np.frombuffer(audioop.alaw2lin(codes, 2), "<i2") / 32768, ALAW)


def test_g711_tables_are_monotonic_and_symmetric() -> None:
    for table in (ULAW, ALAW):
        assert np.array_equal(np.sort(table), -np.sort(table)[::-1])  # as many negative codes as positive
        assert table.max() == -table.min() and np.abs(table).max() < 1.0


@pytest.mark.parametrize(("audio_format", "rate"), [("audio/pcm", 24000), ("audio/pcmu", 8000), ("audio/pcma", 8000)])
def test_chunked_input_decodes_like_whole_input(audio_format: str, rate: int) -> None:
    rng = np.random.default_rng(0)
    data = bytes(rng.integers(0, 256, rate * (2 if audio_format == "audio/pcm" else 1), dtype=np.uint8))  # 1 s
    whole = InputDecoder(audio_format).push(data)
    decoder = InputDecoder(audio_format)
    parts = np.concatenate([decoder.push(data[at : at + 333]) for at in range(0, len(data), 333)])  # odd sizes
    assert parts.shape[0] == whole.shape[0] and np.allclose(parts, whole, atol=1e-5)
    assert abs(whole.shape[0] - 16000) < 1200  # 16 kHz out, less the resampler's delay, which flush gives back
    assert abs(whole.shape[0] + InputDecoder(audio_format).flush().shape[0] - 16000) < 1200
    decoder = InputDecoder(audio_format)
    assert abs(decoder.push(data).shape[0] + decoder.flush().shape[0] - 16000) <= 2


def windows(*runs: tuple[float, int]) -> np.ndarray:
    return np.concatenate([np.full(n, p, np.float32) for p, n in runs])


def test_turns_start_after_a_few_speech_windows_and_stop_after_the_silence() -> None:
    vad = ServerVad(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=320)  # 10 windows
    detector = TurnDetector(vad)
    turns = detector.feed(windows((0.1, 20), (0.9, 2), (0.1, 5), (0.9, 40), (0.4, 5), (0.2, 9), (0.9, 1), (0.1, 10)))
    # A 2-window blip starts nothing; 0.4 (between 0.35 and 0.5) is not yet silence; one 0.9 window inside the
    # silence resets it; then 10 windows under 0.35 stop the turn at the end of the tenth.
    assert turns == [Turn("start", 27 * WINDOW), Turn("stop", (27 + 40 + 5 + 9 + 1 + 10) * WINDOW)]
    assert detector.position == 92 * WINDOW and not detector.speaking


def test_turns_feed_in_pieces_like_at_once() -> None:
    vad = ServerVad(silence_duration_ms=200)
    probs = np.random.default_rng(1).random(500).astype(np.float32)
    whole = TurnDetector(vad).feed(probs)
    detector = TurnDetector(vad)
    pieces = [t for at in range(0, 500, 3) for t in detector.feed(probs[at : at + 3])]
    assert pieces == whole and START_WINDOWS == 3


def test_semantic_turns_ask_at_each_pause_and_wait_at_most_the_eagerness() -> None:
    assert [SemanticVad(e).max_wait_s for e in ("low", "medium", "high", "auto")] == [8, 4, 2, 4]  # type: ignore[arg-type]
    turns = SemanticTurns(SemanticVad("high"))
    got = turns.feed(windows((0.1, 10), (0.9, 30), (0.1, 20)))
    assert got == [Turn("start", 10 * WINDOW), Turn("pause", 47 * WINDOW)]  # 200 ms: 7 quiet windows
    assert turns.position == 47 * WINDOW  # the windows after the pause wait for the decision
    assert turns.decided(got[-1], complete=False) == [] and turns.position == 60 * WINDOW
    got = turns.feed(windows((0.9, 20), (0.1, 10)))  # speech resumes: the same utterance, no new start
    assert got == [Turn("pause", 87 * WINDOW)]
    assert turns.decided(got[-1], complete=False) == []
    # Judged unfinished again, and the silence lasts: the turn ends 2 s after speech stopped (80 windows in).
    assert turns.feed(windows((0.1, 100))) == [Turn("stop", 143 * WINDOW)]  # 80 * 512 + 32000 <= 143 * 512


def test_semantic_turns_a_complete_pause_ends_the_turn_and_the_next_speech_starts_another() -> None:
    turns = SemanticTurns(SemanticVad())
    got = turns.feed(windows((0.9, 10), (0.1, 10), (0.9, 10), (0.1, 10)))
    assert got == [Turn("start", 0), Turn("pause", 17 * WINDOW)]
    assert turns.decided(got[-1], complete=True) == [Turn("start", 20 * WINDOW), Turn("pause", 37 * WINDOW)]
    turns.restart(speaking=False)  # a commit by hand forgets a pause judged unfinished
    assert turns.decided(Turn("pause", 37 * WINDOW), complete=False) == []
    turns.restart(speaking=False)
    assert turns.feed(windows((0.1, 300))) == []


def test_audio_buffer_takes_and_drops_by_position() -> None:
    buffer = AudioBuffer()
    for start in range(0, 1000, 100):
        buffer.append(np.arange(start, start + 100, dtype=np.float32))
    buffer.drop_before(250)
    assert (buffer.start, buffer.end) == (250, 1000)
    assert np.array_equal(buffer.take(200, 400), np.arange(250, 400, dtype=np.float32))  # clipped to what is held
    assert buffer.start == 400
    buffer.clear()
    assert buffer.start == buffer.end == 1000 and buffer.take(1000, 2000).shape == (0,)


def test_audio_buffer_peeks_and_drops_as_one_array_would() -> None:
    """Chunks of random sizes, peeks and drops at random positions (inside chunks, on their edges, past either
    end): every peek equals the same slice of the whole timeline."""
    rng = np.random.default_rng(5)
    buffer, timeline = AudioBuffer(), np.arange(0, dtype=np.float32)
    for _ in range(300):
        chunk = np.arange(timeline.shape[0], timeline.shape[0] + int(rng.integers(0, 50)), dtype=np.float32)
        buffer.append(chunk)
        timeline = np.concatenate([timeline, chunk])
        start, stop = sorted(int(x) for x in rng.integers(buffer.start - 20, buffer.end + 20, 2))
        expected = timeline[max(start, buffer.start) : max(stop, buffer.start)]
        assert np.array_equal(buffer.peek(start, stop), expected)
        if rng.random() < 0.3:
            buffer.drop_before(int(rng.integers(buffer.start, buffer.end + 1)))
            assert np.array_equal(buffer.peek(buffer.start, buffer.end), timeline[buffer.start : buffer.end])


def test_streams_batched_together_give_what_each_gives_alone() -> None:
    rng = np.random.default_rng(2)
    audios = [(rng.standard_normal(16000) * level).astype(np.float32) for level in (0.0, 0.01, 0.3)]
    alone = []
    for audio in audios:
        stream = vad.VadStream()
        alone.append(np.concatenate([stream.push(audio[at : at + 1000]) for at in range(0, 16000, 1000)]))
    streams = [vad.VadStream() for _ in audios]
    sizes = [700, 1000, 1600]  # uneven: rows complete different numbers of windows per batch
    got: list[list[np.ndarray]] = [[] for _ in audios]
    for step in range(0, 24):
        chunks = [audio[step * size : (step + 1) * size] for audio, size in zip(audios, sizes, strict=True)]
        for row, probs in enumerate(vad.push_many(streams, chunks)):
            got[row].append(probs)
    for mine, reference in zip(got, alone, strict=True):
        joined = np.concatenate(mine)[: reference.shape[0]]
        assert joined.shape == reference.shape and np.allclose(joined, reference, atol=1e-4)
