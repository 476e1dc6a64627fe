"""Unit tests: cutting audio around its speech (Silero VAD, real speech under noise), streaming text
assembly, subtitle rendering."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.transcripts import compression_ratio, cue_text, json_body, srt_body, timestamp, vtt_body
from app.chunking import Piece, VadOptions, pieces_from, split_at_silences, whole
from app.errors import InvalidRequest
from app.serving.transcripts import (
    PieceResult,
    TextJoiner,
    Transcript,
    TranscriptionOptions,
    check_language,
    split_language,
)
from app.vad import WINDOW
from tests.support.speech_layout import SAMPLE_RATE, Layout, clip, gap, with_noise

RNG = np.random.default_rng(0)


def covered(pieces: list[Piece], a: float, b: float) -> float:
    """Seconds of [a, b) that pieces cover."""
    return sum(max(0.0, min(b, p.end_s) - max(a, p.start_s)) for p in pieces)


def check_order(pieces: list[Piece], length: int, max_s: float = 30.0) -> None:
    for x, y in pairwise(pieces):
        assert x.end <= y.start, pieces
    for p in pieces:
        assert 0 <= p.start < p.end <= length and p.end - p.start <= max_s * SAMPLE_RATE, p


@pytest.mark.parametrize("snr_db", [None, 10.0, 0.0])
def test_pieces_bracket_speech_and_skip_noise(layout: Layout, snr_db: float | None) -> None:
    audio = layout.audio if snr_db is None else with_noise(layout.audio, snr_db, RNG)
    pieces = split_at_silences(audio, VadOptions())
    check_order(pieces, audio.shape[0])
    assert pieces, "speech under noise is still speech"
    for a, b in layout.silent:  # a noise-only stretch is never in a piece, but for the padding at its edges
        inside = [covered([p], a, b) for p in pieces]
        assert max(inside) <= 1.0 and sum(inside) <= 1.0 + 0.5 * len(pieces), (a, b, pieces)
    (jfk_start, _), (_, fr_end) = layout.speech
    assert abs(pieces[0].start_s - jfk_start) <= 0.5 and abs(pieces[-1].end_s - fr_end) <= 0.5, pieces
    for a, b in layout.speech:  # and the speech is in pieces (JFK's own pauses of about a second are not)
        assert covered(pieces, a, b) >= 0.75 * (b - a), (a, b, pieces)


def test_silence_and_noise_alone_give_no_piece() -> None:
    assert split_at_silences(gap(40.0), VadOptions()) == []
    noise = (RNG.standard_normal(20 * SAMPLE_RATE) * 0.05).astype(np.float32)
    assert split_at_silences(noise, VadOptions()) == []


def test_long_speech_is_cut_into_pieces_of_at_most_30_s(layout: Layout) -> None:
    jfk = clip("jfk.wav")
    audio = np.concatenate([np.concatenate([jfk, gap(0.3)]) for _ in range(8)])  # 90 s, short pauses only
    pieces = split_at_silences(audio, VadOptions())
    check_order(pieces, audio.shape[0])
    assert len(pieces) >= 3
    assert covered(pieces, 0.0, audio.shape[0] / SAMPLE_RATE) >= 0.8 * audio.shape[0] / SAMPLE_RATE


def test_parameters_map_to_the_detector(layout: Layout) -> None:
    tight = split_at_silences(layout.audio, VadOptions(prefix_padding_ms=0))
    padded = split_at_silences(layout.audio, VadOptions(prefix_padding_ms=500))
    assert padded[0].start == tight[0].start - SAMPLE_RATE // 2  # prefix_padding_ms: audio kept before speech
    patient = split_at_silences(layout.audio, VadOptions(silence_duration_ms=5000))
    assert len(patient) == 1 < len(tight) == 2  # silence_duration_ms: a 4 s pause no longer ends the speech
    probs = runs_to_probs([(0.0, 60), (0.6, 60), (0.0, 60)])  # threshold: the probability that is speech
    assert pieces_from(probs, 180 * WINDOW, VadOptions(threshold=0.5, prefix_padding_ms=0)) == [
        Piece(60 * WINDOW, 120 * WINDOW + SAMPLE_RATE // 5)
    ]
    assert pieces_from(probs, 180 * WINDOW, VadOptions(threshold=0.7)) == []


def test_whole_is_one_piece() -> None:
    assert whole(gap(3.0)) == [Piece(0, 3 * SAMPLE_RATE)]


def runs_to_probs(runs: list[tuple[float, int]]) -> np.ndarray:
    return np.concatenate([np.full(n, p, np.float32) for p, n in runs])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0.0, 0.2, 0.45, 0.6, 0.97]), st.integers(1, 1200)), min_size=1, max_size=10),
    st.floats(0.05, 0.95),
    st.integers(20, 3000),
    st.integers(0, 2000),
)
def test_pieces_are_ordered_bounded_and_cover_confident_speech(
    runs: list[tuple[float, int]], threshold: float, silence_ms: int, padding_ms: int
) -> None:
    probs = runs_to_probs(runs)
    length = probs.shape[0] * WINDOW
    pieces = pieces_from(probs, length, VadOptions(threshold, silence_ms, padding_ms))
    check_order(pieces, length)
    at = 0
    for p, n in runs:  # a confident run of at least 0.3 s is speech and is transcribed
        if p >= threshold and n >= 10:
            missed = (
                n
                * WINDOW
                * (
                    1
                    - covered(pieces, at * WINDOW / SAMPLE_RATE, (at + n) * WINDOW / SAMPLE_RATE)
                    / (n * WINDOW / SAMPLE_RATE)
                )
            )
            assert missed <= WINDOW * (len(pieces) + 1), (p, n, at, pieces)
        at += n


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


def test_json_names_the_detected_language_in_languages() -> None:
    """`languages`, as gpt-transcribe returns it (LiveKit reads it): the language known, never a guess."""
    pieces = [PieceResult(0, 1, "a", [], 1, code) for code in ("fr", "en", "fr")]
    assert json_body(Transcript(TranscriptionOptions(), 3.0, pieces))["languages"] == [{"code": "fr"}]
    assert json_body(Transcript(TranscriptionOptions(language="de"), 3.0, pieces))["languages"] == [{"code": "de"}]
    assert "languages" not in json_body(Transcript(TranscriptionOptions(), 3.0, [PieceResult(0, 1, "a", [], 1)]))
    assert "languages" not in json_body(Transcript(TranscriptionOptions(task="translate"), 3.0, pieces))


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
