"""Per-stream caches of Voxtral Realtime in fixed slots: memory is allocated once, per stream bounded by the
model's own windows, so an hour of audio holds what a minute does.

Per slot: the two causal convolutions' left context (conv1: 2 mel frames, conv2: 1 frame), and per attention
layer a ring of the last `window - 1` keys and values (encoder: `audio_config.sliding_window` encoder frames,
decoder: `text_config.sliding_window` tokens): a query at position p sees positions (p - window, p], which is
those `window - 1` and what the same forward adds (transformers' `DynamicSlidingWindowLayer` keeps the same).
Keys are stored rotated at their absolute positions, as transformers caches them. The last slot is scratch:
padding rows read and write it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Ring:
    """Keys and values of every layer of one stack: [slots + 1, size, kv_heads, head_dim] each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    window: int

    @classmethod
    def allocate(cls, config: Any, slots: int, device: torch.device, dtype: torch.dtype) -> Ring:
        window = int(config.sliding_window)
        shape = (slots + 1, window - 1, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        return cls(keys, [torch.zeros(shape, device=device, dtype=dtype) for _ in layers], window)

    @property
    def size(self) -> int:
        return self.window - 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def order(self, seen: torch.Tensor) -> torch.Tensor:
        """[rows, size] ring indices oldest first for rows that have seen `seen` positions (ring index of
        position q is q % size)."""
        return (seen[:, None] + torch.arange(self.size, device=seen.device)) % self.size

    def past_positions(self, seen: torch.Tensor) -> torch.Tensor:
        """[rows, size] absolute positions of the ring's entries oldest first (negative: never written)."""
        return seen[:, None] - self.size + torch.arange(self.size, device=seen.device)

    def gather(self, layer: int, slots: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' past keys and values oldest first, [rows, kv_heads, size, head_dim] (transformers'
        layout)."""
        index = (slots[:, None], order)
        return self.keys[layer][index].transpose(1, 2), self.values[layer][index].transpose(1, 2)

    def write(self, layer: int, slots: torch.Tensor, seen: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a forward's new keys and values ([rows, kv_heads, new, head_dim], positions seen..seen+new-1);
        only the last `size` of them can be seen again."""
        new = min(k.shape[2], self.size)
        first = seen + k.shape[2] - new
        index = (slots[:, None], (first[:, None] + torch.arange(new, device=seen.device)) % self.size)
        self.keys[layer][index] = k[:, :, -new:].transpose(1, 2)
        self.values[layer][index] = v[:, :, -new:].transpose(1, 2)


class RingView:
    """What transformers' attention layers call as their cache for one forward: `update` returns the rows'
    past keys (oldest first) followed by the new ones, and keeps the new ones to be written back after."""

    def __init__(self, ring: Ring, slots: torch.Tensor, seen: torch.Tensor) -> None:
        self.ring, self.slots, self.seen = ring, slots, seen
        self._order = ring.order(seen)
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer_idx] = (key_states, value_states)
        past_k, past_v = self.ring.gather(layer_idx, self.slots, self._order)
        return torch.cat([past_k, key_states], dim=2), torch.cat([past_v, value_states], dim=2)

    def mask(self, new: int) -> torch.Tensor:
        """[rows, 1, new, size + new] boolean: which keys each new query sees (written, causal, in window)."""
        steps = torch.arange(new, device=self.seen.device)
        keys = torch.cat([self.ring.past_positions(self.seen), self.seen[:, None] + steps], dim=1)
        queries = (self.seen[:, None] + steps)[:, :, None]
        seen = (keys[:, None, :] >= 0) & (keys[:, None, :] <= queries) & (keys[:, None, :] > queries - self.ring.window)
        return seen[:, None]

    def commit(self) -> None:
        """Write every layer's new keys and values into the ring."""
        for layer, (k, v) in self.new.items():
            self.ring.write(layer, self.slots, self.seen, k, v)
        self.new.clear()


@dataclass
class ConvState:
    """The causal convolutions' left context per slot: conv1 [slots + 1, mels, 2], conv2 [slots + 1, hidden, 1]."""

    conv1: torch.Tensor
    conv2: torch.Tensor

    @classmethod
    def allocate(cls, embedder: Any, slots: int, device: torch.device, dtype: torch.dtype) -> ConvState:
        def zeros(conv: Any) -> torch.Tensor:
            return torch.zeros(slots + 1, conv.in_channels, conv.left_pad, device=device, dtype=dtype)

        return cls(zeros(embedder.conv1), zeros(embedder.conv2))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv1, self.conv2))


@dataclass
class StreamPool:
    """Every stream cache of the engine, allocated once for `slots` streams (and the scratch slot)."""

    conv: ConvState
    encoder: Ring
    decoder: Ring
    slots: int

    @classmethod
    def allocate(cls, model: Any, slots: int) -> StreamPool:
        first = next(model.parameters())
        device, dtype = first.device, first.dtype
        tower = model.model.audio_tower
        return cls(
            ConvState.allocate(tower.embedder, slots, device, dtype),
            Ring.allocate(model.config.audio_config, slots, device, dtype),
            Ring.allocate(model.config.text_config, slots, device, dtype),
            slots,
        )

    @property
    def scratch(self) -> int:
        return self.slots

    def nbytes(self) -> int:
        return self.conv.nbytes() + self.encoder.nbytes() + self.decoder.nbytes()

    def bytes_per_stream(self) -> int:
        """What one stream holds, whatever its length."""
        return self.nbytes() // (self.slots + 1)

    def reset(self, slot: int) -> None:
        """A new stream starts from silence: zero conv context (the rings are masked by position)."""
        self.conv.conv1[slot].zero_()
        self.conv.conv2[slot].zero_()
