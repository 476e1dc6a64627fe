"""Streaming text deltas: multi-byte characters split across tokens, stop strings across tokens."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.model.text.detok import IncrementalDecoder, trim_at_stop
from tests.support.tekken_vocab import text_ids, vocab

V = vocab("v11")
BYTE = 1000
"""Tekken's first regular tokens are the 256 single bytes."""


def byte_tokens(text: str) -> list[int]:
    return [BYTE + b for b in text.encode()]


def run(decoder: IncrementalDecoder, chunks: list[list[int]]) -> list[str]:
    return [decoder.push(c) for c in chunks] + [decoder.flush()]


def test_a_character_split_across_tokens_waits_for_its_last_byte() -> None:
    for decoder in (IncrementalDecoder.from_bytes(V.bytes_of), IncrementalDecoder(V.text)):
        deltas = run(decoder, [[t] for t in byte_tokens("é🎉a")])
        assert deltas == ["", "é", "", "", "", "🎉", "a", ""]


def test_a_stream_cut_inside_a_character() -> None:
    cut = byte_tokens("aé")[:-1]
    assert "".join(run(IncrementalDecoder.from_bytes(V.bytes_of), [[t] for t in cut])) == V.text(cut) == "a\ufffd"
    assert "".join(run(IncrementalDecoder(V.text), [[t] for t in cut])) == "a"


def test_stop_string_across_tokens_is_held_back_then_trimmed() -> None:
    decoder = IncrementalDecoder.from_bytes(V.bytes_of, ["STOP"])
    assert decoder.push(byte_tokens("hello ST")) == "hello "
    assert decoder.push(byte_tokens("OP and more")) == ""
    assert decoder.stopped and decoder.flush() == ""
    decoder = IncrementalDecoder.from_bytes(V.bytes_of, ["STOP"])
    assert [decoder.push(byte_tokens("a ST")), decoder.push(byte_tokens("ar")), decoder.flush()] == ["a ", "STar", ""]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2999), max_size=4), max_size=20),
    st.lists(st.text(alphabet="ab é", min_size=1, max_size=3), max_size=2),
)
def test_deltas_join_to_the_one_shot_decoding(chunks: list[list[int]], stops: list[str]) -> None:
    ids = [t for c in chunks for t in c]
    expected, _ = trim_at_stop(V.text(ids), stops)
    assert "".join(run(IncrementalDecoder.from_bytes(V.bytes_of, stops), chunks)) == expected


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40), st.integers(1, 5))
def test_any_text_streams_back_whole(text: str, size: int) -> None:
    ids = text_ids("v11", text)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    deltas = run(IncrementalDecoder.from_bytes(V.bytes_of), chunks)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
