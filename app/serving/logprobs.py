"""Token log-probs as OpenAI shows them (chat's `logprobs.content[]`, transcription's `logprobs[]`), typed.

A token's text is its bytes decoded as UTF-8; a token that holds part of a character has no text of its
own, so its text escapes the bytes (`\\xe2\\x80`) and `bytes` carries them raw, as OpenAI does. Control
tokens ([TOOL_CALLS], [ARGS], ...) appear under their names: they are tokens the model chose, never content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from app.model.values import TokenVocab
from app.types import TokenLogprob


class TokenScore(NamedTuple):
    """One token's log-prob: its text, its raw bytes and (chat only) its most likely alternatives. A named
    tuple: an answer with 5 alternatives a token builds six of them per token, on the event loop's thread."""

    token: str
    logprob: float
    raw: bytes
    top: tuple[TokenScore, ...] | None = None
    """Chat's `top_logprobs` (possibly empty); None for a transcription's entries, which have none."""


def _entry(vocab: TokenVocab, token: int, logprob: float, top: tuple[TokenScore, ...] | None = None) -> TokenScore:
    raw = vocab.piece(token)
    return TokenScore(raw.decode("utf-8", errors="backslashreplace"), logprob, raw, top)


def chat_content(vocab: TokenVocab, entries: Sequence[TokenLogprob]) -> list[TokenScore]:
    """`choices[].logprobs.content`: each token with its `top_logprobs` alternatives."""
    return [_entry(vocab, e.token, e.logprob, tuple(_entry(vocab, t, v) for t, v in e.top)) for e in entries]


def transcript_logprobs(vocab: TokenVocab, entries: Sequence[TokenLogprob]) -> list[TokenScore]:
    """`logprobs` of a transcription (`include[]=logprobs`): token, logprob, bytes; control tokens left out,
    as they are out of the text too."""
    return [_entry(vocab, e.token, e.logprob) for e in entries if not vocab.is_special(e.token)]


def mean(entries: Sequence[TokenLogprob]) -> float:
    """A segment's avg_logprob: the mean log-prob of its tokens (0.0 for none)."""
    return sum(e.logprob for e in entries) / len(entries) if entries else 0.0
