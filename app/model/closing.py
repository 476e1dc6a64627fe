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
mask per walked token; most steps of a long answer pay nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.model.toolcalls import TokenVocab

WALK_LIMIT = 4096
"""Tokens after which a walk gives up: a grammar that long to close is treated as unclosable."""
_REMEASURE = 16
"""Far from the end, the distance is measured again after this many tokens."""
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

    def next(self, matcher: Any) -> int | None:
        """The walk's token from this state; None when the grammar allows nothing (an error state)."""
        forced = matcher.compute_ff_tokens()
        if forced:
            return int(forced[0])
        allowed = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = allowed[: self.size].astype(bool)
        if not allowed.any():
            return None
        if allowed[self.eos] and matcher.is_accepting():
            return self.eos
        # Inside a string almost anything goes, "}" included; outside one a letter never does.
        in_string = all(t is not None and allowed[t] for t in self._in_string)
        for token in (*self._string, *self._other) if in_string else self._other:
            if allowed[token]:
                return token
        return int(np.where(allowed, self._lengths, -1).argmax())

    def distance(self, matcher: Any, limit: int = WALK_LIMIT) -> int | None:
        """Tokens (EOS included) the walk takes from this state to the end; None past `limit`."""
        walk = matcher.deep_copy()
        steps = 0
        while steps < limit:
            forced = walk.compute_ff_tokens()
            if forced:
                steps += len(forced)
                if not walk.consume_tokens(forced):
                    return None
                continue
            token = self.next(walk)
            if token is None:
                return None
            steps += 1
            if token == self.eos:
                return steps
            if not walk.consume_token(token):
                return None
        return None

    def after(self, matcher: Any, token: int, limit: int) -> int | None:
        """Tokens to the end if `token` is taken now (it counts as one); None past `limit`."""
        if token == self.eos:
            return 1 if matcher.is_accepting() else None
        walk = matcher.deep_copy()
        if not walk.consume_token(token):
            return None
        rest = self.distance(walk, limit - 1)
        return None if rest is None else rest + 1


class Closer:
    """One row's closing state: the last distance measured, so it measures only near the end."""

    def __init__(self, policy: ClosingPolicy) -> None:
        self.policy = policy
        self.last: int | None = None
        self.unmeasured = 0
        """Tokens since the last measure: a token that opens a nested object can lengthen the way out."""

    def settle(self, matcher: Any, token: int, remaining: int) -> int:
        """`token`, unless taking it would leave too few of the `remaining` tokens to close; then the walk's."""
        self.unmeasured += 1
        if self.last is not None and remaining > 2 * self.last + 16 and self.unmeasured < _REMEASURE:
            return token
        self.unmeasured = 0
        after = self.policy.after(matcher, token, remaining)
        if after is not None and after <= remaining:
            self.last = after
            return token
        closing = self.policy.next(matcher)
        self.last = self.policy.distance(matcher)
        return closing if closing is not None else token


def _ids(by_bytes: dict[bytes, int], pieces: tuple[bytes, ...]) -> list[int]:
    return [by_bytes[p] for p in pieces if p in by_bytes]
