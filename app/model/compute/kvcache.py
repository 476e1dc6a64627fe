"""The prefill's KV cache: appends in place instead of copying the whole history.

Decoding runs over the slot cache (app/model/compute/slots.py); a prefill still runs transformers' forward
pass, and its keys and values land here before they are placed in slots.

transformers' `DynamicLayer` grows by `torch.cat` on every step, so each step copies every
cached key and value of every row: O(length) per token, O(length^2) per request. For Voxtral
Mini (120 KB of keys and values a token) at 32 rows of 1,000 tokens that is ~4 GB copied per
step on the GPU: about the memory traffic of reading the decoder's weights. Here each layer
keeps a buffer with spare room behind the valid part and hands attention a view of the valid
part; it copies only when the room runs out, then leaves 1/8 more, so the amortised copy is a
few tokens' worth per step for <= 12.5 % more memory.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

_MIN_ROOM = 64
"""Tokens of room left at least, so short prompts do not regrow every few steps."""


def _room(length: int) -> int:
    return max(_MIN_ROOM, length // 8)


class GrowingLayer(DynamicLayer):
    """`keys` / `values` are views of the valid part of larger buffers ([batch, heads, capacity, dim])."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]  # transformers' DynamicLayer is untyped
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if self._k is None or self._v is None or end > self._k.shape[-2]:
            self._grow(key_states, value_states, end)
        assert self._k is not None and self._v is not None
        self._k[..., self._length : end, :] = key_states
        self._v[..., self._length : end, :] = value_states
        self.adopt(self._k, self._v, end)
        return self.valid()

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        k = _empty_like(key_states, key_states.shape[0], needed)
        v = _empty_like(value_states, value_states.shape[0], needed)
        if self._k is not None and self._v is not None and self._length:
            k[..., : self._length, :] = self._k[..., : self._length, :]
            v[..., : self._length, :] = self._v[..., : self._length, :]
        self._k, self._v = k, v

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take buffers whose first `length` positions are valid."""
        self.device, self.is_initialized = keys.device, True
        self._k, self._v, self._length = keys, values, length
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None, "empty cache layer"
        return self._k[..., : self._length, :], self._v[..., : self._length, :]

    def get_seq_length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._k = self._v = None
        self._length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the engine never crops a cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the engine never repeats cache rows")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("decoding rows live in the slot cache (app/model/compute/slots.py)")


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s: what the model's forward fills and extends."""

    def __init__(self, num_layers: int) -> None:
        self.growing = [GrowingLayer() for _ in range(num_layers)]
        Cache.__init__(self, layers=list(self.growing))

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The valid (keys, values) of each layer."""
        return [layer.valid() for layer in self.growing]


def _empty_like(t: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    return t.new_empty((rows, t.shape[1], width + _room(width), t.shape[-1]))
