"""Forced output that always completes: steer a grammar-constrained row to its end within `max_tokens`.

On random weights (or a weak model) a JSON string never ends by itself: a forced call cut by `max_tokens`
would be a broken call. So each row measures how far its grammar is from the end, as the number of tokens
a greedy closing walk takes (`ClosingPolicy.distance`), and once a sampled token would leave fewer tokens
than that, the walk's token is taken instead ("closing mode"). Along the walk the distance falls by one a
token, so the row ends (EOS included) exactly in time.

The walk, on a copy of the llguidance matcher: the grammar's forced tokens (`compute_ff_tokens`); EOS once
the grammar accepts; inside a string, the quote that closes it; elsewhere the tokens that close (`}`, `]`),
then the shortest values (`""`, `0`, `null`, `true`, `[]`, `{}`); failing all, the allowed token with the
longest bytes (through a pattern or an enum the fastest). It is a heuristic, not a shortest-path search,
but it is the walk the row follows, so a request is refused (400) only when even it does not fit.

Cost: the distance is measured only near the end (remaining <= 2 x the last distance + 16 tokens), one
mask per walked token, read bit by bit (no unpacking); most steps of a long answer pay nothing. Near the
end a row keeps its last way out and checks its next token against it with llguidance's `validate_tokens`
(a fraction of a walk's cost: docs/PERF.md#model-closing-walk): inside a string every plain token leaves the way
out as it was, so the row walks again only when its token breaks the path or does its first step. A kept
path is checked, so it is a valid way out whatever happens; that it is also the walk a fresh measure would
take is what tests/unit/test_masks.py holds (the same tokens and distances as walking every time).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.model.values import TokenVocab

WALK_LIMIT = 4096
"""Tokens after which a walk gives up: a grammar that long to close is treated as unclosable."""
_REMEASURE = 16
"""Far from the end, the distance is measured again after this many tokens."""
_LONGEST_SIZE = 1024
"""Masks whose longest token is remembered (16 KB each at 131,072 tokens)."""
_STRING_CLOSERS = (b'"}', b'"]', b'"', b'"}]')
_CLOSERS = (b"}]", b"}", b"]")
_SHORT_VALUES = (b'""', b"0", b"null", b"true", b"false", b"[]", b"{}", b'"')


class ClosingPolicy:
    """The closing walk's token preferences for one tokenizer."""

    def __init__(self, vocab: TokenVocab) -> None:
        by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(vocab.pieces):
            if piece and not vocab.is_special(i):
                by_bytes.setdefault(piece, i)
        self.eos = vocab.eos_id
        self.size = vocab.size
        self._in_string = [by_bytes.get(b"x"), by_bytes.get(b"}")]
        self._string = _ids(by_bytes, _STRING_CLOSERS)
        markers = [t for t in (vocab.args_id,) if t is not None]  # [ARGS] before an optional [CALL_ID]
        self._other = markers + _ids(by_bytes, _CLOSERS + _SHORT_VALUES)
        lengths = [len(vocab.special_names[i]) if vocab.is_special(i) else len(p) for i, p in enumerate(vocab.pieces)]
        self._lengths = np.array(lengths, dtype=np.int64)
        self._longests: dict[bytes, int] = {}

    def next(self, matcher: Any) -> int | None:
        """The walk's token from this state; None when the grammar allows nothing (an error state)."""
        forced = matcher.compute_ff_tokens()
        return int(forced[0]) if forced else self._choose(matcher)

    def _choose(self, matcher: Any) -> int | None:
        """`next` where nothing is forced. Reads single bits of the packed mask: unpacking 131,072 of them
        for each walked token was half the walk's cost; only the last resort (the longest token) needs all."""
        mask = matcher.compute_bitmask()
        if not _any(mask, self.size):
            return None
        if _has(mask, self.eos) and matcher.is_accepting():
            return self.eos
        # Inside a string almost anything goes, "}" included; outside one a letter never does.
        in_string = all(t is not None and _has(mask, t) for t in self._in_string)
        for token in (*self._string, *self._other) if in_string else self._other:
            if _has(mask, token):
                return token
        return self._longest(mask)

    def _longest(self, mask: bytes) -> int:
        """The allowed token with the longest bytes (the first of them). Remembered by mask: walks meet the
        same few states again and again (after `": ` in JSON, every value must start with a space)."""
        token = self._longests.get(mask)
        if token is None:
            ids = _allowed_ids(mask, self.size)  # ascending: argmax takes the first longest, as over the whole mask
            if len(self._longests) >= _LONGEST_SIZE:
                self._longests.clear()  # one call, safe beside the API thread's walks (`Constrainer.shortest`)
            token = self._longests[mask] = int(ids[self._lengths[ids].argmax()])
        return token

    def distance(self, matcher: Any, limit: int = WALK_LIMIT) -> int | None:
        """Tokens (EOS included) the walk takes from this state to the end; None past `limit`."""
        path = self.walk(matcher.deep_copy(), limit)
        return None if path is None else _steps(path)

    def walk(self, walk: Any, limit: int) -> list[tuple[int, ...]] | None:
        """The walk from `walk`'s state (the matcher is moved along), as its steps: forced tokens together,
        then one chosen token a step, EOS last; None past `limit` tokens or on a refusal."""
        path: list[tuple[int, ...]] = []
        steps = 0
        while steps < limit:
            forced = walk.compute_ff_tokens()
            if forced:
                path.append(tuple(int(t) for t in forced))
                steps += len(forced)
                if not walk.consume_tokens(forced):
                    return None
                continue
            token = self._choose(walk)
            if token is None:
                return None
            path.append((token,))
            steps += 1
            if token == self.eos:
                return path
            if not walk.consume_token(token):
                return None
        return None

    def after(self, matcher: Any, token: int, limit: int) -> list[tuple[int, ...]] | None:
        """The walk if `token` is taken now: `token` first, then the walk from there (its length in tokens
        is the distance to the end); None past `limit` tokens."""
        if token == self.eos:
            return [(token,)] if matcher.is_accepting() else None
        walk = matcher.deep_copy()
        if not walk.consume_token(token):
            return None
        rest = self.walk(walk, limit - 1)
        return None if rest is None else [(token,), *rest]


class Closer:
    """One row's closing state: the last distance measured, so it measures only near the end, and a way out
    (a closing path, EOS last) to check the row's next token against.

    The path is checked, not trusted: llguidance's `validate_tokens` says whether the row's token followed
    by the path is still a way to the end, far cheaper than walking it again (a mask per walked token).
    Inside a string, the usual case, any plain token keeps the same way out (close the quote, then the
    rest), so most steps near the end need no walk at all; a token that breaks the path (a quote, a
    bracket) makes the row walk again from its new state."""

    def __init__(self, policy: ClosingPolicy) -> None:
        self.policy = policy
        self.last: int | None = None
        self.unmeasured = 0
        """Tokens since the last measure: a token that opens a nested object can lengthen the way out."""
        self.path: tuple[int, ...] | None = None
        """A way out, EOS last: from the row's current state when last set; checked before each use."""

    def settle(self, matcher: Any, token: int, remaining: int) -> int:
        """`token`, unless taking it would leave too few of the `remaining` tokens to close; then the path's."""
        self.unmeasured += 1
        if self.last is not None and remaining > 2 * self.last + 16 and self.unmeasured < _REMEASURE:
            if self.path and self.path[0] == token:
                self.path = self.path[1:] or None
            return token
        self.unmeasured = 0
        after = self._after(matcher, token, remaining)
        if after is not None and len(after) <= remaining:
            self.last, self.path = len(after), after[1:] or None
            return token
        path = self.path if self.path and _follows(matcher, self.path) else self._walk(matcher, WALK_LIMIT)
        if path is None:  # no way out within the limit: still the walk's first token, if any
            self.last = self.path = None
            closing = self.policy.next(matcher)
            return closing if closing is not None else token
        self.last, self.path = len(path), path[1:] or None
        return path[0]

    def _after(self, matcher: Any, token: int, limit: int) -> tuple[int, ...] | None:
        """A way out that starts with `token`: the known path after it where it still leads to the end,
        else the walk from the state after `token`; None past `limit` tokens."""
        if token == self.policy.eos:
            return (token,) if matcher.is_accepting() else None
        if self.path and self.path[0] == token:
            if _follows(matcher, self.path):
                return self.path
        elif self.path and _follows(matcher, (token, *self.path)) and not _follows(matcher, (token, *self.path[1:])):
            return (token, *self.path)  # unless `token` did the path's first step: `-6` ends what `-60` would
        after = self.policy.after(matcher, token, limit)
        return None if after is None else _flat(after)

    def _walk(self, matcher: Any, limit: int) -> tuple[int, ...] | None:
        path = self.policy.walk(matcher.deep_copy(), limit)
        return None if path is None else _flat(path)

    def forget(self) -> None:
        """The row's state moved some other way (a refused token): the known path is dropped."""
        self.path = None


def _follows(matcher: Any, path: tuple[int, ...]) -> bool:
    """Whether `path` (EOS last) takes the matcher's state to the end: every token allowed in turn, and EOS
    only where the grammar accepts. The matcher does not move."""
    return bool(matcher.validate_tokens(list(path)) == len(path))


def _flat(path: list[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(token for step in path for token in step)


def _steps(path: list[tuple[int, ...]]) -> int:
    return sum(len(step) for step in path)


def _has(mask: bytes, token: int) -> bool:
    """Bit `token` of a packed little-endian mask."""
    return bool(mask[token >> 3] >> (token & 7) & 1)


def _allowed_ids(mask: bytes, size: int) -> np.ndarray:
    """The ids a packed mask allows, ascending, from its nonzero bytes only (a few dozen, where the walk
    falls back to them, against 16,384 bytes at 131,072 tokens)."""
    packed = np.frombuffer(mask, dtype=np.uint8)[: (size + 7) // 8]
    if len(packed) % 8 == 0:  # 8 bytes at once: the scan for nonzero bytes is the cost
        wide = np.flatnonzero(packed.view(np.uint64))
        where = (wide[:, None] * 8 + np.arange(8)).ravel()
        where = where[packed[where] != 0]
    else:
        where = np.flatnonzero(packed)
    bits = np.unpackbits(packed[where], bitorder="little").reshape(-1, 8).astype(bool)
    ids: np.ndarray = ((where * 8)[:, None] + np.arange(8))[bits]
    return ids[ids < size]


def _any(mask: bytes, size: int) -> bool:
    """Whether any of the first `size` bits is set."""
    whole, rest = divmod(size, 8)
    if any(mask[:whole]):
        return True
    return bool(rest) and whole < len(mask) and bool(mask[whole] & ((1 << rest) - 1))


def _ids(by_bytes: dict[bytes, int], pieces: tuple[bytes, ...]) -> list[int]:
    return [by_bytes[p] for p in pieces if p in by_bytes]
