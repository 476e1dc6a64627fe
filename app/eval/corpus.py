"""The evaluation set: audio files paired with their reference texts, found in a directory tree.

Two layouts, mixed freely: a sibling `NAME.txt` beside `NAME.<any audio suffix>` (the whole file is the
reference), and LibriSpeech's `SPEAKER-CHAPTER.trans.txt` per chapter (one `UTTERANCE-ID text` line per
utterance, beside `UTTERANCE-ID.flac`). Any non-text file with a reference is taken as audio: the server's
decoder, not the suffix, decides what it can read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TRANSCRIPT_SUFFIX = ".trans.txt"


class CorpusError(ValueError):
    """The directory holds no usable pairs, or a transcript file is malformed."""


@dataclass(frozen=True)
class Sample:
    id: str
    """The audio's path relative to the directory, without its suffix: stable across runs, sorted on."""
    audio: Path
    reference: str


def find_samples(directory: Path) -> list[Sample]:
    """Every audio file under `directory` that has a reference, sorted by id; an error if there is none."""
    if not directory.is_dir():
        raise CorpusError(f"{directory} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    chapters = _chapter_transcripts(f for f in files if f.name.endswith(TRANSCRIPT_SUFFIX))
    samples = []
    for audio in (f for f in files if f.suffix != ".txt"):
        reference = _sibling_text(audio)
        if reference is None:
            reference = chapters.get((audio.parent, audio.stem))
        if reference is not None:
            samples.append(Sample(str(audio.relative_to(directory).with_suffix("")), audio, reference))
    if not samples:
        raise CorpusError(
            f"no audio with a reference text under {directory}: put NAME.txt beside each NAME.wav (or any audio "
            f"suffix), or use LibriSpeech's layout (a SPEAKER-CHAPTER{TRANSCRIPT_SUFFIX} beside the .flac files)"
        )
    return samples


def _sibling_text(audio: Path) -> str | None:
    text = audio.with_suffix(".txt")
    return text.read_text(encoding="utf-8").strip() if text.is_file() else None


def _chapter_transcripts(paths: Iterable[Path]) -> dict[tuple[Path, str], str]:
    """(directory, utterance id) -> text, from every LibriSpeech chapter transcript."""
    found: dict[tuple[Path, str], str] = {}
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            if not text:
                raise CorpusError(f"{path}:{number}: expected 'UTTERANCE-ID text', got {line!r}")
            found[(path.parent, utterance)] = text
    return found
