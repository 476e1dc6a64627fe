"""Log-probs in OpenAI's shapes: chat's `logprobs.content[]` and transcription's `logprobs[]`.

A token's text is its bytes decoded as UTF-8; a token that holds part of a character has no text of its
own, so its text escapes the bytes (`\\xe2\\x80`) and `bytes` carries them raw, as OpenAI does. Control
tokens ([TOOL_CALLS], [ARGS], ...) appear under their names: they are tokens the model chose, never content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.model.toolcalls import TokenVocab
from app.types import TokenLogprob


def token_bytes(vocab: TokenVocab, token: int) -> bytes:
    return vocab.bytes_of([token], keep_special=True)


def _entry(vocab: TokenVocab, token: int, logprob: float) -> dict[str, Any]:
    raw = token_bytes(vocab, token)
    return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": logprob, "bytes": list(raw)}


def chat_content(vocab: TokenVocab, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[].logprobs.content`: each token with its `top_logprobs` alternatives."""
    out = []
    for e in entries:
        item = _entry(vocab, e.token, e.logprob)
        item["top_logprobs"] = [_entry(vocab, token, value) for token, value in e.top]
        out.append(item)
    return out


def chat_logprobs(vocab: TokenVocab, entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """A choice's `logprobs`: None when the request did not ask."""
    if entries is None:
        return None
    return {"content": chat_content(vocab, entries), "refusal": None}


def transcript_logprobs(vocab: TokenVocab, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """`logprobs` of a transcription (`include[]=logprobs`): token, logprob, bytes; control tokens left out,
    as they are out of the text too."""
    return [_entry(vocab, e.token, e.logprob) for e in entries if not vocab.is_special(e.token)]


def mean(entries: Sequence[TokenLogprob]) -> float:
    """A segment's avg_logprob: the mean log-prob of its tokens (0.0 for none)."""
    return sum(e.logprob for e in entries) / len(entries) if entries else 0.0
