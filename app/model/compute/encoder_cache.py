"""Audio embeddings computed once: the audio encoder's projected output of each audio, by its samples' hash.

The same recording comes back: transcribed again, asked about in every turn of a conversation, once per `n`
choice. Its embeddings (the audio tower and projector run over every 30 s window: the costliest part of an
audio prefill) are kept here on the model's device, keyed by a hash of the decoded 16 kHz samples
(`app.audio.samples_key`), so a repeat runs the decoder only. The key is the whole audio's, not a
window's: Whisper's log-mel scales every window by the loudest frame of the audio, so a window's
embedding depends on all of it.

Bounded in bytes, least recently used first out. A hit gives exactly the tensor a miss computed, so answers
with the cache on equal those with it off up to the batch the audio was first encoded in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheStats:
    queries: int
    hits: int
    bytes: int
    entries: int


class EncoderCache:
    """One worker thread reads and writes it (the model worker); `stats` may be read from any thread."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._queries = 0
        self._hits = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        self._queries += 1
        found = self._entries.get(key)
        if found is not None:
            self._hits += 1
            self._entries.move_to_end(key)
        return found

    def put(self, key: bytes, embeddings: torch.Tensor) -> None:
        """Keep `embeddings`, dropping the least recently used until they fit; larger than the whole cache:
        not kept."""
        size = embeddings.numel() * embeddings.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self._bytes + size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()
        self._entries[key] = embeddings
        self._bytes += size

    def stats(self) -> CacheStats:
        return CacheStats(self._queries, self._hits, self._bytes, len(self._entries))
