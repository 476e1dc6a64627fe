"""Token ids -> text deltas for streaming, never splitting a multi-byte character or leaking
the start of a stop string that may still complete.

Given the token bytes (chat), Python's incremental UTF-8 decoder makes the deltas join to exactly
what decoding all the tokens at once gives, at O(1) per token; any other decode function works too,
by decoding everything again per token.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


def trim_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the first stop string, as OpenAI does (the stop string is not returned)."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class _Redecode:
    """Any decode function: decode everything again each time; hold back a trailing U+FFFD, the start of
    a character whose other bytes are in tokens still to come (dropped if the stream ends there)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._done = 0

    def feed(self, token_ids: list[int], final: bool) -> str:
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        if final:
            text = text.rstrip("\ufffd")
        elif text.endswith("\ufffd"):
            return ""
        new, self._done = text[self._done :], max(self._done, len(text))
        return new


class _Utf8:
    """Token bytes through Python's incremental UTF-8 decoder: O(1) per token, and the pieces join to
    exactly the one-shot decoding (an unfinished last character becomes U+FFFD, as there)."""

    def __init__(self, to_bytes: Callable[[list[int]], bytes]) -> None:
        self._to_bytes = to_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: list[int], final: bool) -> str:
        return str(self._utf8.decode(self._to_bytes(token_ids), final=final))


class IncrementalDecoder:
    """Feed token ids as they come; get the text that is safe to send so far."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._source: _Redecode | _Utf8 = _Redecode(decode)
        self._stops = tuple(s for s in stops if s)
        self._unsent = ""
        """Decoded text not sent yet: at most the start of a stop string."""
        self.count = 0
        self.stopped = False

    @classmethod
    def from_bytes(cls, to_bytes: Callable[[list[int]], bytes], stops: Sequence[str] = ()) -> IncrementalDecoder:
        decoder = cls(lambda ids: "", stops)
        decoder._source = _Utf8(to_bytes)
        return decoder

    def push(self, token_ids: list[int]) -> str:
        self.count += len(token_ids)
        if self.stopped:
            return ""
        return self._release(self._source.feed(token_ids, final=False), final=False)

    def flush(self) -> str:
        """The rest, at the end of the stream."""
        if self.stopped:
            return ""
        return self._release(self._source.feed([], final=True), final=True)

    def _release(self, new: str, final: bool) -> str:
        text, self.stopped = trim_at_stop(self._unsent + new, self._stops)
        keep = 0 if self.stopped or final else _held_back(text, self._stops)
        self._unsent = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]
