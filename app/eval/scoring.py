"""The gate's arithmetic: word error rate over normalised texts, and the agreement of two token sequences.

WER: both texts go through Whisper's English normaliser (transformers' `EnglishTextNormalizer`, the same class as
openai/whisper's, with Whisper's spelling map from `app/data/`), then jiwer aligns the words (Levenshtein) and
counts substitutions S, deletions D, insertions I and hits H against the N reference words. A set's WER is
pooled, (S + D + I) / N summed over its files, not a mean of per-file rates. A reference that normalises to no
words has no WER of its own (None); its hypothesis words still count as insertions in the pooled figure; a set
with no reference words at all has no WER.

Token agreement of a baseline's tokens `a` and a candidate's `b` for one file: `hits / max(len(a), len(b))`, where
hits are the positions a Levenshtein alignment of the two id sequences pairs as equal (1.0 when both are empty).
Its first divergence is the first index `i` with `a[i] != b[i]`, or the shorter length when one is a prefix of the
other; None when they are identical.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jiwer
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

SPELLING_MAP = Path(__file__).resolve().parent.parent / "data" / "whisper-english-spelling.json"


@cache
def _normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer(json.loads(SPELLING_MAP.read_text(encoding="utf-8")))


def normalize(text: str) -> str:
    """Whisper's English normalisation: lower case, no punctuation, numbers as digits, American spelling."""
    return str(_normalizer()(text))


@dataclass(frozen=True)
class WordErrors:
    """Word-level alignment counts of hypotheses against references (one file, or a set pooled)."""

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def reference_words(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def wer(self) -> float | None:
        """(S + D + I) / N; None without reference words."""
        errors = self.substitutions + self.deletions + self.insertions
        return errors / self.reference_words if self.reference_words else None

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(
            self.hits + other.hits,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    """The counts of `hypothesis` against `reference`, both normalised first."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref.split():  # jiwer wants a reference word; every hypothesis word is then an insertion
        return WordErrors(insertions=len(hyp.split()))
    out = jiwer.process_words(ref, hyp)
    return WordErrors(out.hits, out.substitutions, out.deletions, out.insertions)


def pooled(errors: Sequence[WordErrors]) -> WordErrors:
    return sum(errors, WordErrors())


@dataclass(frozen=True)
class TokenAgreement:
    """One file's tokens under two configurations, aligned (see the module docstring)."""

    hits: int
    length: int
    """max(len(a), len(b)): the denominator."""
    first_divergence: int | None

    @property
    def agreement(self) -> float:
        return self.hits / self.length if self.length else 1.0

    @property
    def identical(self) -> bool:
        return self.first_divergence is None


def token_agreement(a: Sequence[int], b: Sequence[int]) -> TokenAgreement:
    length = max(len(a), len(b))
    if list(a) == list(b):
        return TokenAgreement(length, length, None)
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if not a or not b:
        return TokenAgreement(0, length, first)
    # jiwer aligns words: each token id is one "word", so its hits are the alignment's equal positions.
    hits = jiwer.process_words(" ".join(map(str, a)), " ".join(map(str, b))).hits
    return TokenAgreement(hits, length, first)
