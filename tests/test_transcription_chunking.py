"""Pure unit tests: cutting audio at silences, streaming text assembly, subtitle rendering."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.transcripts import (
    PieceResult,
    TextJoiner,
    Transcript,
    TranscriptionOptions,
    check_language,
    compression_ratio,
    cue_text,
    split_language,
    srt_body,
    timestamp,
    vtt_body,
)
from app.chunking import FRAME, MIN_SPEECH_FRAMES, SAMPLE_RATE, Piece, VadOptions, split_at_silences, whole
from app.errors import InvalidRequest

RNG = np.random.default_rng(0)


def speech(seconds: float, level: float = 0.1) -> np.ndarray:
    """Noise bursts stand in for speech: loud, with no pause of their own."""
    return (RNG.standard_normal(int(seconds * SAMPLE_RATE)) * level).astype(np.float32)


def gap(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def layout(parts: list[tuple[float, float]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(speech s, gap s) pairs -> audio and the sample ranges of its gaps."""
    chunks, gaps, at = [], [], 0
    for talk, pause in parts:
        chunks += [speech(talk), gap(pause)]
        at += int(talk * SAMPLE_RATE)
        gaps.append((at, at + int(pause * SAMPLE_RATE)))
        at += int(pause * SAMPLE_RATE)
    return np.concatenate(chunks), gaps


def check_pieces(audio: np.ndarray, pieces: list[Piece], max_s: float = 30.0) -> None:
    assert pieces == sorted(pieces, key=lambda p: p.start)
    for a, b in pairwise(pieces):
        assert a.end <= b.start
    for p in pieces:
        assert 0 <= p.start < p.end <= audio.shape[0] and p.end - p.start <= max_s * SAMPLE_RATE
    covered = np.zeros(audio.shape[0], dtype=bool)
    for p in pieces:
        covered[p.start : p.end] = True
    lost = np.count_nonzero(audio[~covered])
    assert lost <= (len(pieces) + 1) * MIN_SPEECH_FRAMES * FRAME, "only sound too short to be speech is left out"


def test_short_audio_is_one_piece() -> None:
    audio = speech(12.0)
    assert split_at_silences(audio, VadOptions()) == whole(audio) == [Piece(0, audio.shape[0])]


def test_cuts_fall_in_pauses_near_the_window_end() -> None:
    audio, gaps = layout([(9.5, 0.4)] * 12)
    pieces = split_at_silences(audio, VadOptions())
    check_pieces(audio, pieces)
    assert len(pieces) <= 6
    for piece in pieces[1:]:
        assert any(a <= piece.start <= b for a, b in gaps), piece
        assert piece.start - pieces[pieces.index(piece) - 1].start >= 20 * SAMPLE_RATE


def test_the_longest_late_pause_wins_and_keeps_prefix_padding() -> None:
    audio, gaps = layout([(21.0, 0.3), (1.0, 2.0), (4.0, 0.25), (20.0, 0.0)])
    first_cut = split_at_silences(audio, VadOptions(prefix_padding_ms=300))[1].start
    assert first_cut == gaps[1][1] - int(0.3 * SAMPLE_RATE)


def test_audio_without_pauses_is_cut_at_the_limit() -> None:
    audio = speech(95.0)
    pieces = split_at_silences(audio, VadOptions())
    check_pieces(audio, pieces)
    assert [p.start for p in pieces[1:]] == [p.end for p in pieces[:-1]]
    assert all(p.end - p.start > 15 * SAMPLE_RATE for p in pieces[:-1])


def test_silence_alone_gives_no_piece() -> None:
    assert split_at_silences(gap(75.0), VadOptions()) == []


def test_long_silence_inside_is_skipped() -> None:
    audio = np.concatenate([speech(10.0), gap(70.0), speech(10.0)])
    pieces = split_at_silences(audio, VadOptions())
    check_pieces(audio, pieces)
    assert sum(p.end - p.start for p in pieces) < 21 * SAMPLE_RATE
    assert pieces[0].end == int(10.3 * SAMPLE_RATE) and pieces[-1].start == int(79.7 * SAMPLE_RATE)


def test_quiet_recordings_are_cut_like_loud_ones() -> None:
    audio, _ = layout([(9.5, 0.4)] * 6)
    loud = split_at_silences(audio, VadOptions())
    assert split_at_silences(audio * 0.01, VadOptions()) == loud


def test_threshold_decides_what_is_silence() -> None:
    quiet_talk = np.concatenate([speech(20.0), speech(1.0, level=0.003), speech(20.0)])
    sensitive = split_at_silences(quiet_talk, VadOptions(threshold=0.1))
    strict = split_at_silences(quiet_talk, VadOptions(threshold=0.9))
    assert strict[1].start != sensitive[1].start  # at 0.9 the quiet second is a pause to cut in
    assert 20 * SAMPLE_RATE <= strict[1].start <= 21 * SAMPLE_RATE


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.05, 40.0), st.floats(0.0, 3.0)), min_size=1, max_size=12),
    st.floats(0.0, 1.0),
    st.integers(20, 2000),
    st.integers(0, 1000),
)
def test_pieces_are_ordered_bounded_and_cover_all_sound(
    parts: list[tuple[float, float]], threshold: float, silence_ms: int, padding_ms: int
) -> None:
    audio, _ = layout(parts)
    if audio.shape[0] < FRAME:
        return
    options = VadOptions(threshold, silence_ms, padding_ms)
    check_pieces(audio, split_at_silences(audio, options))


# -- text ------------------------------------------------------------------------------------------
def test_split_language() -> None:
    assert split_language("lang:en Hello") == ("Hello", "en")
    assert split_language("  lang:fr\nBonjour") == ("Bonjour", "fr")
    assert split_language("language models") == ("language models", None)
    assert split_language("lang:english") == ("lang:english", None)
    assert split_language("lang:e", final=False) is None
    assert split_language("la", final=False) is None
    assert split_language("lang:de", final=False) is None
    assert split_language("lang:de x", final=False) == ("x", "de")


PIECE_TEXT = st.one_of(
    st.text(alphabet=" \nabclang:é€", max_size=20),
    st.builds(lambda c, t: f"lang:{c}{t}", st.sampled_from(["en", "fr", "de"]), st.text(" xyz", max_size=8)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PIECE_TEXT, st.lists(st.integers(0, 30), max_size=4)), max_size=5))
def test_streamed_text_is_the_non_streamed_text(pieces: list[tuple[str, list[int]]]) -> None:
    joiner, results, streamed = TextJoiner(), [], ""
    for raw, splits in pieces:
        bounds = sorted({0, len(raw), *(min(s, len(raw)) for s in splits)})
        for a, b in pairwise(bounds):
            streamed += joiner.add(raw[a:b])
        streamed += joiner.end_piece()
        text, language = split_language(raw) or ("", None)
        results.append(PieceResult(0.0, 1.0, text.strip(), [], 1, language))
    assert streamed == joiner.text == Transcript(TranscriptionOptions(), 1.0, results).text


def test_detected_language_is_the_most_common() -> None:
    pieces = [PieceResult(0, 1, "a", [], 1, code) for code in ("fr", "en", "fr", None)]
    assert Transcript(TranscriptionOptions(), 3.0, pieces).language == "fr"
    assert Transcript(TranscriptionOptions(language="de"), 3.0, pieces).language == "de"
    assert Transcript(TranscriptionOptions(task="translate"), 3.0, pieces).language == "en"
    assert Transcript(TranscriptionOptions(), 3.0, []).language is None


def test_check_language() -> None:
    assert check_language(None) is None and check_language(" ") is None
    assert check_language("EN") == "en"
    with pytest.raises(InvalidRequest, match="en, es, fr, pt, hi, de, nl, it"):
        check_language("zz")


# -- subtitles -------------------------------------------------------------------------------------
def test_timestamps() -> None:
    assert timestamp(0.0, ",") == "00:00:00,000"
    assert timestamp(3661.5004, ",") == "01:01:01,500"
    assert timestamp(59.9996, ".") == "00:01:00.000"


def test_srt_and_vtt_bodies() -> None:
    pieces = [
        PieceResult(0.0, 29.5, "Hello there.", [1], 10),
        PieceResult(29.5, 40.0, "", [], 10),
        PieceResult(40.0, 61.25, "A --> B\n\nsecond line", [2], 10),
    ]
    transcript = Transcript(TranscriptionOptions(), 61.25, pieces)
    assert srt_body(transcript) == (
        "1\n00:00:00,000 --> 00:00:29,500\nHello there.\n\n2\n00:00:40,000 --> 00:01:01,250\nA -> B\nsecond line\n"
    )
    assert vtt_body(transcript) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:29.500\nHello there.\n\n00:00:40.000 --> 00:01:01.250\nA -> B\nsecond line\n"
    )
    assert transcript.text == "Hello there. A --> B\n\nsecond line"


def test_cue_text_and_compression_ratio() -> None:
    assert cue_text("  a \n\n b ") == "a\nb"
    assert cue_text("a ---> b --> c\r\nd") == "a -> b -> c\nd"
    assert compression_ratio("") == 0.0
    assert compression_ratio("la " * 200) > 2.4 > compression_ratio("The quick brown fox jumps over the lazy dog.")
