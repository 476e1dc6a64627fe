"""Property tests for everything that parses or writes untrusted data: the audio decoder, incremental
detokenisation, tool-call parsing, transcript writers (SRT/VTT, streamed text) and silence chunking.

Deterministic (`derandomize=True`: the same examples every run) and bounded; no example database is
written into the tree.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import string
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app import chunking
from app.api import transcripts
from app.audio import SAMPLE_RATE, AudioLimits, decode_audio
from app.errors import AudioDecodeError, AudioTooLong
from app.model.compute.loader import LoadedModel
from app.model.text.detok import IncrementalDecoder, trim_at_stop
from app.serving import transcripts as served
from tests.support.server import AUDIO

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = AudioLimits(max_seconds=30)


# --- the audio decoder ------------------------------------------------------------------------------


def _short_clips() -> dict[str, bytes]:
    """Two seconds of the jfk clip in each container the server reads, as seeds for mutation."""
    samples, rate = sf.read(AUDIO / "jfk.wav", dtype="float32", frames=2 * 16000)
    clips: dict[str, bytes] = {}
    for fmt, subtype in [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]:
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
        clips[f"{fmt}-{subtype}"] = buffer.getvalue()
    for name in ("jfk.mp3", "jfk.m4a", "jfk.webm", "jfk.ogg"):
        clips[name] = (AUDIO / name).read_bytes()[:60_000]  # a cut compressed file is itself a test
    return clips


CLIPS = _short_clips()


def assert_decodes_or_refuses(data: bytes, filename: str | None) -> None:
    """The decoder's contract: float32 mono 16 kHz finite samples, or one of its two errors; never anything else."""
    try:
        audio = decode_audio(data, LIMITS, filename)
    except (AudioDecodeError, AudioTooLong) as exc:
        assert exc.message.startswith(("Could not decode the audio file", "Audio is")), exc.message
        return
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.shape[0] > 0
    assert audio.shape[0] <= (LIMITS.max_seconds + 1) * SAMPLE_RATE
    assert np.isfinite(audio).all()


NAMES = st.sampled_from([None, "a.wav", "a.mp3", "a.m4a", "a.webm", "a.flac", "a.ogg", "a", "a.exe"])


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096), filename=NAMES)
def test_random_bytes_only_ever_raise_the_decoders_own_errors(data: bytes, filename: str | None) -> None:
    assert_decodes_or_refuses(data, filename)


@settings(FUZZ, max_examples=150)
@given(
    data=st.sampled_from(sorted(CLIPS)).flatmap(
        lambda name: st.tuples(
            st.just(CLIPS[name]),
            st.lists(st.tuples(st.integers(0, len(CLIPS[name]) - 1), st.integers(0, 255)), min_size=1, max_size=8),
        )
    ),
    head_bias=st.booleans(),
    filename=NAMES,
)
def test_mutated_audio_files_only_ever_raise_the_decoders_own_errors(
    data: tuple[bytes, list[tuple[int, int]]], head_bias: bool, filename: str | None
) -> None:
    """Byte flips in real files, mostly in the first 64 bytes when `head_bias` (where headers live)."""
    clip, flips = data
    mutated = bytearray(clip)
    for position, value in flips:
        mutated[position % 64 if head_bias else position] = value
    assert_decodes_or_refuses(bytes(mutated), filename)


@settings(FUZZ, max_examples=150)
@given(name=st.sampled_from(sorted(CLIPS)), cut=st.floats(0.0, 1.0), filename=NAMES)
def test_truncated_audio_files_only_ever_raise_the_decoders_own_errors(
    name: str, cut: float, filename: str | None
) -> None:
    clip = CLIPS[name]
    assert_decodes_or_refuses(clip[: int(len(clip) * cut)], filename)


# --- incremental detokenisation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab(loaded: LoadedModel) -> Any:
    from app.model.text.vocabulary import read_vocab

    return read_vocab(loaded.processor.tokenizer.tokenizer.instruct_tokenizer.tokenizer)


@pytest.fixture(scope="module")
def tokenizer(loaded: LoadedModel) -> Any:
    return loaded.processor.tokenizer


def token_ids(vocab: Any) -> st.SearchStrategy[list[int]]:
    """Mostly regular tokens, with many lone high bytes (split UTF-8) and some special tokens."""
    high = [i for i, piece in enumerate(vocab.pieces) if piece and max(piece) >= 0x80]
    specials = sorted(vocab.special_names)[:40]
    one = st.one_of(st.integers(len(specials), vocab.size - 1), st.sampled_from(high), st.sampled_from(specials))
    return st.lists(one, min_size=0, max_size=40)


def groups(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """`ids` in consecutive groups (an engine event may carry several tokens)."""
    out, start = [], 0
    for size in sizes:
        out.append(ids[start : start + size])
        start += size
    out.append(ids[start:])
    return out


def stream(decoder: IncrementalDecoder, batches: list[list[int]]) -> str:
    return "".join(decoder.push(batch) for batch in batches) + decoder.flush()


@FUZZ
@given(data=st.data())
def test_byte_level_deltas_join_to_the_one_shot_text_cut_at_the_stop(vocab: Any, data: st.DataObject) -> None:
    ids = data.draw(token_ids(vocab))
    full = vocab.bytes_of(ids).decode("utf-8", errors="replace")
    stops = data.draw(stop_strings(full))
    sizes = data.draw(st.lists(st.integers(0, 4), max_size=20))
    decoder = IncrementalDecoder.from_bytes(vocab.bytes_of, stops)
    joined = stream(decoder, groups(ids, sizes))
    expected, stopped = trim_at_stop(full, stops)
    assert joined == expected
    assert decoder.stopped == stopped
    assert decoder.count == len(ids)


@FUZZ
@given(data=st.data())
def test_redecoding_deltas_join_to_the_one_shot_text_cut_at_the_stop(tokenizer: Any, vocab: Any, data: Any) -> None:
    """The generic path (any decode function; transcription streams use the tokenizer's decode)."""
    ids = data.draw(token_ids(vocab))

    def decode(some: list[int]) -> str:
        return str(tokenizer.decode(some, skip_special_tokens=True))

    full = decode(ids)
    stops = data.draw(stop_strings(full))
    # A U+FFFD that stands for a character still unfinished at the end is no text a client can stop at:
    # the stream drops it (below), so a stop string spanning it cannot match there.
    assume(not any("\ufffd" in stop for stop in stops))
    sizes = data.draw(st.lists(st.integers(0, 4), max_size=20))
    joined = stream(IncrementalDecoder(decode, stops), groups(ids, sizes))
    expected, stopped = trim_at_stop(full, stops)
    # A character still unfinished when the stream ends is dropped, not sent as U+FFFD.
    assert joined == (expected if stopped else expected.rstrip("\ufffd"))


def stop_strings(text: str) -> st.SearchStrategy[list[str]]:
    """Stop strings that occur in the text (so they do cut it), that almost occur, or random ones."""
    inside = st.builds(lambda a, n: text[a : a + n], st.integers(0, max(0, len(text) - 1)), st.integers(1, 6))
    near = inside.map(lambda s: s + "\x00")
    return st.lists(st.one_of(inside, near, st.text(max_size=4)), max_size=3)


# --- tool calls -------------------------------------------------------------------------------------


NAME = st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
ARGUMENTS = st.dictionaries(st.text(max_size=10), JSON_VALUE, max_size=5)


def encode_call(vocab: Any, name: str, arguments: dict[str, Any], call_id: str | None) -> list[int]:
    ids = [vocab.tool_calls_id, *vocab.encode(name)]
    if call_id is not None:
        ids += [vocab.call_id_id, *vocab.encode(call_id)]
    return [*ids, vocab.args_id, *vocab.encode(json.dumps(arguments, ensure_ascii=False))]


@FUZZ
@given(
    calls=st.lists(
        st.tuples(NAME, ARGUMENTS, st.none() | st.text(string.ascii_letters + string.digits, min_size=9, max_size=9)),
        min_size=1,
        max_size=3,
    )
)
def test_marked_tool_calls_parse_back_to_what_was_called(vocab: Any, calls: list[Any]) -> None:
    from app.model.text.toolcalls import parse_calls

    ids = [t for name, arguments, call_id in calls for t in encode_call(vocab, name, arguments, call_id)]
    parsed = parse_calls(ids, vocab, {name for name, _, _ in calls})
    assert parsed is not None
    assert [(p.name, json.loads(p.arguments)) for p in parsed] == [(n, a) for n, a, _ in calls]
    for call, (_, _, call_id) in zip(parsed, calls, strict=True):
        assert re.fullmatch(r"[a-zA-Z0-9]{9}", call.id)
        assert call_id is None or call.id == call_id


@FUZZ
@given(calls=st.lists(st.fixed_dictionaries({"name": NAME, "arguments": ARGUMENTS}), min_size=1, max_size=3))
def test_json_tool_calls_parse_back_to_what_was_called(vocab: Any, calls: list[dict[str, Any]]) -> None:
    """The pre-v11 layout: [TOOL_CALLS] then a JSON list of {"name", "arguments"}."""
    from app.model.text.toolcalls import parse_calls

    json_vocab = dataclasses.replace(vocab, syntax="json")
    ids = [vocab.tool_calls_id, *vocab.encode(json.dumps(calls, ensure_ascii=False))]
    parsed = parse_calls(ids, json_vocab)
    assert parsed is not None
    assert [{"name": p.name, "arguments": json.loads(p.arguments)} for p in parsed] == calls


@FUZZ
@given(data=st.data(), syntax=st.sampled_from(["v11", "v13", "json"]), finish=st.sampled_from(["stop", "length"]))
def test_any_token_sequence_reads_as_text_or_well_formed_calls(
    vocab: Any, data: st.DataObject, syntax: str, finish: str
) -> None:
    from app.model.text.callstream import chat_output
    from app.model.text.toolcalls import parse_calls

    marked = dataclasses.replace(vocab, syntax=syntax)
    markers = [vocab.tool_calls_id, vocab.args_id, vocab.call_id_id]
    ids = data.draw(st.lists(st.one_of(st.sampled_from(markers), token_ids(vocab).map(lambda x: x[:3])), max_size=12))
    flat = [t for part in ids for t in (part if isinstance(part, list) else [part])]
    names = data.draw(st.none() | st.frozensets(NAME, max_size=3))
    stops = data.draw(st.lists(st.text(max_size=3), max_size=2))
    for call in parse_calls(flat, marked, names) or []:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", call.name)
        assert isinstance(json.loads(call.arguments), dict)
    output = chat_output(flat, finish, marked, names, stops)
    specials = set(vocab.special_names.values())
    assert output.content is None or not any(name in output.content for name in specials if name)
    if output.finish_reason == "tool_calls":
        assert names is not None and finish == "stop" and output.calls
        assert all(call.name in names and isinstance(json.loads(call.arguments), dict) for call in output.calls)
    elif not output.calls:
        assert isinstance(output.content, str)


@FUZZ
@given(openai_id=st.text(max_size=80))
def test_any_openai_call_id_maps_to_a_stable_mistral_one(openai_id: str) -> None:
    from app.model.text.toolcalls import mistral_call_id

    mapped = mistral_call_id(openai_id)
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", mapped)
    assert mistral_call_id(openai_id) == mapped
    assert mistral_call_id(mapped) == mapped


# --- transcripts: SRT, VTT, streamed text -----------------------------------------------------------


CUE_TEXT = st.lists(
    st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from(["-->", "--->", "\n", "\r\n", " ", "-", ">"]),
    min_size=1,
    max_size=20,
).map(lambda parts: "".join(parts).strip())  # fmt: skip
"""Model output, as the service stores it (stripped): arrows, blank lines, CRLF, any Unicode."""


@st.composite
def transcript_pieces(draw: st.DrawFn) -> list[Any]:
    bounds = sorted(draw(st.lists(st.floats(0, 4 * 3600, allow_nan=False), min_size=2, max_size=12)))
    texts = draw(st.lists(CUE_TEXT, min_size=len(bounds) // 2, max_size=len(bounds) // 2))
    return [served.PieceResult(bounds[2 * i], bounds[2 * i + 1], text, [1, 2], 10) for i, text in enumerate(texts)]


TIMING = r"(\d{2,}):(\d{2}):(\d{2})[,.](\d{3}) --> (\d{2,}):(\d{2}):(\d{2})[,.](\d{3})"


def parse_cues(body: str, srt: bool) -> list[tuple[float, float, list[str]]]:
    """A strict reader: blocks separated by one blank line; SRT numbers its cues from 1."""
    if not srt:
        assert body.startswith("WEBVTT\n\n")
        body = body[len("WEBVTT\n\n") :]
    if not body:
        return []
    assert body.endswith("\n") and not body.endswith("\n\n\n")
    cues = []
    for number, block in enumerate(body.rstrip("\n").split("\n\n"), start=1):
        lines = block.split("\n")
        if srt:
            assert lines.pop(0) == str(number), block
        timing = re.fullmatch(TIMING, lines[0])
        assert timing, block
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, timing.groups())
        text = lines[1:]
        assert text and all(line.strip() for line in text), f"a cue without text, or a blank line in one: {block!r}"
        assert not any("-->" in line for line in text), f"an arrow in cue text reads as a timing line: {block!r}"
        cues.append((h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000, text))
    return cues


@FUZZ
@given(pieces=transcript_pieces(), srt=st.booleans())
def test_srt_and_vtt_read_back_as_one_cue_per_segment_at_its_times(pieces: list[Any], srt: bool) -> None:
    transcript = served.Transcript(served.TranscriptionOptions(), 4 * 3600, pieces)
    body = transcripts.srt_body(transcript) if srt else transcripts.vtt_body(transcript)
    cues = parse_cues(body, srt)
    assume(all(re.sub(r"\s", "", p.text) for p in transcript.segments))  # whitespace-only text has no cue line
    assert len(cues) == len(transcript.segments)
    for (start, end, _), piece in zip(cues, transcript.segments, strict=True):
        assert abs(start - piece.start_s) <= 0.0005 + 1e-9 and abs(end - piece.end_s) <= 0.0005 + 1e-9
        assert start <= end


@FUZZ
@given(text=CUE_TEXT)
def test_no_arrow_survives_in_cue_text(text: str) -> None:
    """cue_text once replaced '-->' once, so '--->' became '-->', which readers take for a timing line."""
    assert "-->" not in transcripts.cue_text(text)


RAW_PIECE = st.lists(
    st.sampled_from(["lang:en", "lang:fr ", " lang:", "la", "ng:", "l", " ", "  hello", "world ", "é", "\n", "x"]),
    max_size=6,
).map("".join)  # fmt: skip
"""What a piece's decoded tokens may look like: an optional `lang:xx` prefix, split anywhere."""


@FUZZ
@given(raws=st.lists(RAW_PIECE, min_size=1, max_size=4), data=st.data())
def test_streamed_transcript_text_is_exactly_the_non_streamed_text(raws: list[str], data: st.DataObject) -> None:
    joiner, streamed = served.TextJoiner(), ""
    for raw in raws:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=4)))
        parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        streamed += "".join(joiner.add(part) for part in parts) + joiner.end_piece()
    texts = [(served.split_language(raw) or ("", None))[0].strip() for raw in raws]
    assert streamed == " ".join(t for t in texts if t)


# --- chunking at silences ---------------------------------------------------------------------------


@st.composite
def long_audio(draw: st.DrawFn) -> np.ndarray:
    """Up to ~3 minutes of noise bursts, tones and silences at random levels."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        seconds = draw(st.sampled_from([0.005, 0.05, 0.3, 1.0, 4.0, 12.0, 31.0]))
        level = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.05, 0.9]))
        n = int(seconds * SAMPLE_RATE)
        kind = draw(st.sampled_from(["noise", "tone", "silence"]))
        if kind == "noise":
            parts.append(rng.standard_normal(n).astype(np.float32) * level)
        elif kind == "tone":
            parts.append((level * np.sin(np.arange(n) * 0.2)).astype(np.float32))
        else:
            parts.append(np.zeros(n, np.float32))
    return np.concatenate(parts)


@settings(FUZZ, max_examples=20)
@given(
    audio=long_audio(),
    threshold=st.floats(0.0, 1.0),
    silence_ms=st.integers(20, 10_000),
    padding_ms=st.integers(0, 10_000),
)
def test_pieces_are_ordered_disjoint_in_bounds_and_at_most_30_s(
    audio: np.ndarray, threshold: float, silence_ms: int, padding_ms: int
) -> None:
    options = chunking.VadOptions(threshold, silence_ms, padding_ms)
    pieces = chunking.split_at_silences(audio, options)
    limit = int(options.max_piece_s * SAMPLE_RATE)
    previous_end = 0
    for piece in pieces:
        assert previous_end <= piece.start < piece.end <= audio.shape[0], pieces
        assert piece.end - piece.start <= limit, (piece, limit)
        previous_end = piece.end


@settings(FUZZ, max_examples=25)
@given(seconds=st.floats(0.001, 70.0), level=st.sampled_from([0.0, 1e-7]))
def test_silence_of_any_length_gives_no_pieces(seconds: float, level: float) -> None:
    audio = np.full(int(seconds * SAMPLE_RATE) + 1, level, np.float32)
    assert chunking.split_at_silences(audio, chunking.VadOptions()) == []


def test_the_corpus_of_seeds_is_real_audio() -> None:
    """The mutation seeds decode before they are mutated (otherwise the mutation tests prove little)."""
    for name, clip in CLIPS.items():
        if name.endswith((".mp3", ".m4a", ".webm", ".ogg")):
            continue  # cut to 60 kB: may or may not decode, both are fine
        assert decode_audio(clip, LIMITS).shape[0] == pytest.approx(2 * SAMPLE_RATE, abs=200), name
