"""Automatic prefix caching over the slot KV cache: which slot already holds a prompt's first tokens.

Interface (stable; serving, metrics and benchmarks build on it):
- `Row.cache_salt: str | None` (in: None shares prefixes across every request of the model, a string keeps
  them among rows of the same salt, vLLM's `cache_salt`) and `Row.cached_tokens: int` (out: prompt tokens
  taken from the cache at the row's first prefill, in whole blocks, vLLM's `num_cached_tokens`: a fully cached
  prompt of 32 tokens prefills only its last one, yet counts 16, as vLLM, which recomputes that whole block);
- `BatchGenerator(..., prefix_caching=True)`, and `BatchGenerator.prefix_stats() -> PrefixStats`.

Cached prefixes live in the slots (app/model/compute/slots.py): a slot no row holds keeps what its last row
left there, so the cache's budget is the slot cache's own and a running row never loses its history to a
cached prefix. `PrefixIndex` maps vLLM-style chained hashes of full blocks of `BLOCK` tokens to the slots
whose positions hold them. A token's identity is its id, or for an audio token (the audio's
`app.audio.samples_key`, its index within that audio): the same recording keys the same anywhere in a prompt,
and one different sample keys every one of its tokens differently (the encoder's log-mel scales by the whole
audio). The first block's hash mixes in the model and the row's salt.

Invariant: a slot's entries name only blocks its positions hold, at those positions. Whoever writes a slot
(prefill, a slot move, a fan-out copy) drops its entries before the write and names what it holds only once
the write has succeeded (a copy may fail part way, one layer written); a row that leaves registers its final
tokens (prompt and generated, as far as the cache holds them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLOCK = 16
"""Tokens a block: the unit a prefix is found in (vLLM's default block size)."""


@dataclass(frozen=True)
class PrefixStats:
    """vLLM's `PrefixCacheStats` meanings (`prefix_cache_queries` / `prefix_cache_hits`), since start, and what
    the cache holds. A preempted row's recompute is counted apart (`preempted_*`), as vLLM does; hits are
    whole blocks (`Row.cached_tokens`). Immutable: the generator's thread publishes one, any thread reads it."""

    queries: int
    """Prompt tokens looked up at first prefills."""
    hits: int
    """Of them, tokens found cached, in whole blocks."""
    cached_slots: int
    """Slots no row holds whose content is a cached prefix."""
    cached_bytes: int
    """The KV bytes of those prefixes (their full blocks)."""
    requests: int = 0
    """Rows looked up at first prefills."""
    preempted_requests: int = 0
    """Preempted rows recomputed (prompt and generated tokens)."""
    preempted_queries: int = 0
    """Their tokens looked up."""
    preempted_hits: int = 0
    """Of them, tokens found cached, in whole blocks."""


def seed(model: str, salt: str | None) -> bytes:
    """The parent hash of a row's first block: the model and the row's `cache_salt` (None: shared)."""
    tag = b"\x00" if salt is None else b"\x01" + salt.encode()
    return hashlib.blake2b(b"prefix\x00" + model.encode() + b"\x00" + tag, digest_size=16).digest()


def chain(
    tokens: Sequence[int],
    prompt_len: int,
    audio_token_id: int,
    audios: Sequence[tuple[bytes, int]],
    parent: bytes,
    start: int = 0,
) -> list[bytes] | None:
    """The chained hash of each full block of `tokens` from block `start` on (`parent`: the seed, or the hash
    of block `start - 1`, so that `chain(t, ..., h[k - 1], k)` is `h[k:]` for `h = chain(t, ..., seed)`:
    a row's prompt hashed once is extended over what it generates); audio tokens are those of
    `tokens[:prompt_len]` equal to `audio_token_id`, the i-th run of `audios[i][1]` of them standing for the
    audio of key `audios[i][0]`. None when the prompt's audio tokens do not add up to the audios' counts
    (nothing is cached then)."""
    ids = np.asarray(tokens, dtype=np.int64)
    is_audio = np.zeros(len(ids), dtype=np.bool_)
    is_audio[:prompt_len] = ids[:prompt_len] == audio_token_id
    where = np.flatnonzero(is_audio)
    counts = np.asarray([count for _, count in audios], dtype=np.int64)
    if int(counts.sum()) != len(where):
        return None
    values = ids.copy()
    owner = np.full(len(ids), -1, dtype=np.int64)
    if len(where):
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        values[where] = np.arange(len(where)) - starts
        owner[where] = np.repeat(np.arange(len(audios)), counts)
    # One conversion each, sliced per block; an audio token's owner, -1 for the others.
    flags, words, owners = is_audio.tobytes(), values.tobytes(), owner.tolist() if len(where) else []
    width = values.itemsize * BLOCK
    hashes: list[bytes] = []
    for block in range(start, len(ids) // BLOCK):
        first = block * BLOCK
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(flags[first : first + BLOCK])
        digest.update(words[block * width : block * width + width])
        for audio in sorted(set(owners[first : first + BLOCK])):  # ascending: the order the audios come in
            if audio >= 0:
                digest.update(audios[audio][0])
        parent = digest.digest()
        hashes.append(parent)
    return hashes


@dataclass
class RowChain:
    """A row's block hashes as far as computed, with what extends them (its audios' keys and counts, its seed):
    its prompt is hashed once, at its prefill, and only the blocks after are hashed when it leaves."""

    audios: list[tuple[bytes, int]]
    parent: bytes
    hashes: list[bytes]

    def extend(self, tokens: Sequence[int], prompt_len: int, audio_token_id: int) -> list[bytes] | None:
        """`chain` of `tokens` (which start with the tokens `hashes` were computed over): the known hashes,
        then those of the blocks after them."""
        known = self.hashes[: len(tokens) // BLOCK]
        if len(known) * BLOCK + BLOCK > len(tokens):
            return known
        parent = known[-1] if known else self.parent
        more = chain(tokens, prompt_len, audio_token_id, self.audios, parent, len(known))
        return None if more is None else known + more


class PrefixIndex:
    """Block hash -> the slots holding that block; each slot's blocks; when each slot was last used.

    Bounded by the slots: each holds at most `max_len / BLOCK` entries, dropped when the slot is written."""

    def __init__(self, slots: int) -> None:
        self._blocks: list[list[bytes]] = [[] for _ in range(slots)]
        self._where: dict[bytes, set[int]] = {}
        self._used = [0] * slots
        self._clock = 0
        self._total = 0
        self._filled = 0

    def match(self, hashes: Sequence[bytes]) -> tuple[int, set[int]]:
        """The most leading blocks of `hashes` some slot holds, and the slots that hold that many."""
        found = 0
        slots: set[int] = set()
        for count, block in enumerate(hashes, start=1):
            holders = self._where.get(block)
            if not holders:
                break
            found, slots = count, holders
        return found, set(slots)

    def assign(self, slot: int, hashes: Sequence[bytes], used: int | None = None) -> None:
        """`slot` now holds exactly the blocks `hashes` (its former entries dropped); used now, or at `used`
        (a prefix moved between slots keeps its place in the eviction order)."""
        self.forget(slot)
        self._blocks[slot] = list(hashes)
        self._total += len(hashes)
        self._filled += bool(hashes)
        for block in hashes:
            self._where.setdefault(block, set()).add(slot)
        if used is None:
            self.touch(slot)
        else:
            self._used[slot] = used

    def used(self, slot: int) -> int:
        """When `slot` was last used (a logical clock)."""
        return self._used[slot]

    def forget(self, slot: int) -> None:
        """`slot` holds no known block (about to be overwritten)."""
        for block in self._blocks[slot]:
            holders = self._where.get(block)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._where[block]
        self._total -= len(self._blocks[slot])
        self._filled -= bool(self._blocks[slot])
        self._blocks[slot] = []

    def hashes(self, slot: int) -> list[bytes]:
        """The blocks `slot` holds, first first."""
        return list(self._blocks[slot])

    def touch(self, slot: int) -> None:
        self._clock += 1
        self._used[slot] = self._clock

    def blocks(self, slot: int) -> int:
        return len(self._blocks[slot])

    def totals(self) -> tuple[int, int]:
        """Blocks held over all slots, and the slots holding any (kept as entries change, not counted)."""
        return self._total, self._filled

    def eviction_order(self, slots: Sequence[int]) -> list[int]:
        """`slots` in the order to overwrite them: empty ones first (lowest first), then least recently used."""
        return sorted(slots, key=lambda s: (bool(self._blocks[s]), self._used[s] if self._blocks[s] else s))

    def entries(self) -> int:
        """Distinct block hashes indexed (bounded by slots x blocks a slot)."""
        return len(self._where)
