"""Token log-probs as OpenAI shows them (chat's `logprobs.content[]`, transcription's `logprobs[]`), typed.

A token's text is its bytes decoded as UTF-8; a token that holds part of a character has no text of its
own, so its text escapes the bytes (`\\xe2\\x80`) and `bytes` carries them raw, as OpenAI does. Control
tokens ([TOOL_CALLS], [ARGS], ...) appear under their names: they are tokens the model chose, never content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from app.model.toolcalls import TokenVocab
from app.types import TokenLogprob


@dataclass(frozen=True)
class TokenScore:
    """One token's log-prob: its text, its raw bytes and (chat only) its most likely alternatives."""

    token: str
    logprob: float
    raw: bytes
    top: tuple[TokenScore, ...] | None = None
    """Chat's `top_logprobs` (possibly empty); None for a transcription's entries, which have none."""


def token_bytes(vocab: TokenVocab, token: int) -> bytes:
    return vocab.bytes_of([token], keep_special=True)


def _entry(vocab: TokenVocab, token: int, logprob: float) -> TokenScore:
    raw = token_bytes(vocab, token)
    return TokenScore(raw.decode("utf-8", errors="backslashreplace"), logprob, raw)


def chat_content(vocab: TokenVocab, entries: Sequence[TokenLogprob]) -> list[TokenScore]:
    """`choices[].logprobs.content`: each token with its `top_logprobs` alternatives."""
    out = []
    for e in entries:
        top = tuple(_entry(vocab, token, value) for token, value in e.top)
        out.append(replace(_entry(vocab, e.token, e.logprob), top=top))
    return out


def transcript_logprobs(vocab: TokenVocab, entries: Sequence[TokenLogprob]) -> list[TokenScore]:
    """`logprobs` of a transcription (`include[]=logprobs`): token, logprob, bytes; control tokens left out,
    as they are out of the text too."""
    return [_entry(vocab, e.token, e.logprob) for e in entries if not vocab.is_special(e.token)]


def mean(entries: Sequence[TokenLogprob]) -> float:
    """A segment's avg_logprob: the mean log-prob of its tokens (0.0 for none)."""
    return sum(e.logprob for e in entries) / len(entries) if entries else 0.0
