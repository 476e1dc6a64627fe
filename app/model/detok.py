"""Token ids -> text deltas for streaming, never splitting a multi-byte character or leaking
the start of a stop string that may still complete."""

from __future__ import annotations

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


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(stops)
        self._ids: list[int] = []
        self._sent = 0
        self.stopped = False

    @property
    def count(self) -> int:
        return len(self._ids)

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text, self.stopped = trim_at_stop(self._decode(self._ids), self._stops)
        if self.stopped:
            return self._take(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        return self._take(text[: len(text) - _held_back(text, self._stops)])

    def flush(self) -> str:
        if self.stopped:
            return ""
        text, _ = trim_at_stop(self._decode(self._ids), self._stops)
        return self._take(text.rstrip("\ufffd"))

    def _take(self, text: str) -> str:
        delta = text[self._sent :]
        self._sent = max(self._sent, len(text))
        return delta
