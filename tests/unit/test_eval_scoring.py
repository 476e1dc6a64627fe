"""Unit tests: the quality gate's arithmetic (WER against hand-counted cases, Whisper's normaliser on cases
from openai/whisper's tests/test_normalizer.py, token agreement), the evaluation set's layouts, and the
candidate configuration's overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from app.eval.configs import OverrideError, candidate, parse_overrides
from app.eval.corpus import CorpusError, find_samples
from app.eval.scoring import WordErrors, normalize, pooled, token_agreement, word_errors


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Let's", "let us"),
        ("he's like", "he is like"),
        ("Mr. Park visited Assoc. Prof. Kim Jr.", "mister park visited associate professor kim junior"),
        ("mobilisation", "mobilization"),  # Whisper's spelling map (app/data) is loaded
        ("nineteen ninety nine", "1999"),
        ("two point five million", "2500000"),
        ("ninety percent", "90%"),
    ],
)
def test_whisper_normaliser(text: str, normalised: str) -> None:
    assert normalize(text) == normalised


@pytest.mark.parametrize(
    ("hypothesis", "counts", "wer"),
    [
        ("the cat sat", WordErrors(hits=3), 0.0),
        ("The cat, sat!", WordErrors(hits=3), 0.0),  # case and punctuation are normalised away
        ("the dog sat", WordErrors(hits=2, substitutions=1), 1 / 3),
        ("the sat", WordErrors(hits=2, deletions=1), 1 / 3),
        ("the cat sat down", WordErrors(hits=3, insertions=1), 1 / 3),
        ("", WordErrors(deletions=3), 1.0),
        ("a dog sat down here", WordErrors(hits=1, substitutions=2, insertions=2), 4 / 3),
    ],
)
def test_word_errors_hand_counted(hypothesis: str, counts: WordErrors, wer: float) -> None:
    got = word_errors("the cat sat", hypothesis)
    assert got == counts
    assert got.wer == pytest.approx(wer, abs=1e-12)


def test_empty_reference_has_no_wer_but_its_words_count_as_insertions() -> None:
    empty = word_errors("", "hello there")
    assert empty == WordErrors(insertions=2) and empty.wer is None
    assert pooled([empty, word_errors("a b", "a b")]).wer == 1.0  # 2 insertions over 2 reference words
    assert pooled([word_errors("", "")]).wer is None
    assert word_errors("um", "").wer is None  # a filler the normaliser drops leaves no reference words


def test_pooled_wer_weighs_files_by_their_words() -> None:
    files = [word_errors("yes", "no"), word_errors("red green blue", "red green blue")]
    assert pooled(files) == WordErrors(hits=3, substitutions=1)
    assert pooled(files).wer == 0.25  # not the mean of the files' rates (0.5)


@pytest.mark.parametrize(
    ("a", "b", "hits", "length", "first"),
    [
        ([1, 2, 3], [1, 2, 3], 3, 3, None),
        ([1, 2, 3, 4], [1, 5, 3], 2, 4, 1),  # a substitution and a deletion
        ([1, 2], [1, 2, 3], 2, 3, 2),  # a prefix diverges where the shorter ends
        ([9, 1, 2, 3], [1, 2, 3], 3, 4, 0),  # one insertion: the rest still aligns
        ([], [4], 0, 1, 0),
        ([], [], 0, 0, None),
    ],
)
def test_token_agreement(a: list[int], b: list[int], hits: int, length: int, first: int | None) -> None:
    got = token_agreement(a, b)
    assert (got.hits, got.length, got.first_divergence) == (hits, length, first)
    assert got.agreement == (hits / length if length else 1.0)
    assert got.identical == (first is None)


def test_sibling_texts_and_librispeech_layout(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"x")
    (tmp_path / "a.txt").write_text("Hello there.\n")
    (tmp_path / "orphan.mp3").write_bytes(b"x")  # no reference: skipped
    chapter = tmp_path / "84" / "121123"
    chapter.mkdir(parents=True)
    for utterance in ("84-121123-0000", "84-121123-0001"):
        (chapter / f"{utterance}.flac").write_bytes(b"x")
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS\n")
    samples = find_samples(tmp_path)
    assert [(s.id, s.reference) for s in samples] == [
        ("84/121123/84-121123-0000", "GO DO YOU HEAR"),
        ("84/121123/84-121123-0001", "BUT IN LESS"),
        ("a", "Hello there."),
    ]


def test_a_directory_without_pairs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"x")
    with pytest.raises(CorpusError, match="no audio with a reference text"):
        find_samples(tmp_path)
    (tmp_path / "a-1.trans.txt").write_text("a\n")
    with pytest.raises(CorpusError, match="expected 'UTTERANCE-ID text'"):
        find_samples(tmp_path)


def test_overrides_are_settings_fields_with_valid_values() -> None:
    base = Settings(model="tiny")
    assert parse_overrides(["dtype=bfloat16", "max-batch-size=4"]) == {"dtype": "bfloat16", "max_batch_size": "4"}
    other = candidate(base, parse_overrides(["dtype=bfloat16", "max-batch-size=4"]))
    assert (other.dtype, other.max_batch_size, other.model) == ("bfloat16", 4, "tiny")
    with pytest.raises(OverrideError, match="no setting 'dtpye'; did you mean dtype"):
        parse_overrides(["dtpye=bfloat16"])
    with pytest.raises(OverrideError, match="key=value"):
        parse_overrides(["bfloat16"])
    with pytest.raises(OverrideError, match="dtype"):
        candidate(base, {"dtype": "int3"})
