"""Per-stream caches of Voxtral Realtime in fixed slots: memory is allocated once, per stream bounded by the
model's own windows, so an hour of audio holds what a minute does.

Per slot: the two causal convolutions' left context (conv1: 2 mel frames, conv2: 1 frame), and per attention
layer a ring of keys and values (encoder: `audio_config.sliding_window` encoder frames, decoder:
`text_config.sliding_window` tokens): a query at position p sees positions (p - window, p]. The ring holds
`window - 1 + step` entries, `step` the positions a steady forward adds (decoder 1, encoder the projector's
downsampling), so such a forward writes its new keys into the ring first and attends over the ring in place:
what it overwrites is out of every query's window. Position q lives at ring index q % size. Attention reads the
entries in ring order, not oldest first: keys carry their rotary position already and the mask is computed from
each entry's absolute position (written, causal, in window), so no copy reorders them. Keys are stored rotated
at their absolute positions, as transformers caches them. The last slot is scratch: rows that only fill a step
write there (a free slot's own row writes that slot), whatever slot they read (app/model/realtime/engine.py,
`RealtimeEngine._layout`; `RingView.writes`).
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
    step: int = 1
    """Most new positions a forward writes before attending (more: `RingView` attends, then writes)."""

    @classmethod
    def allocate(cls, config: Any, slots: int, device: torch.device, dtype: torch.dtype, step: int = 1) -> Ring:
        window = int(config.sliding_window)
        shape = (slots + 1, window - 1 + step, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        return cls(keys, [torch.zeros(shape, device=device, dtype=dtype) for _ in layers], window, step)

    @property
    def size(self) -> int:
        return self.window - 1 + self.step

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def positions(self, seen: torch.Tensor) -> torch.Tensor:
        """[rows, size] the absolute position each entry holds, in ring order, once `seen` positions were
        written: the latest q < seen with q % size == index (negative: never written)."""
        last = seen[:, None] - 1
        return last - (last - torch.arange(self.size, device=seen.device)) % self.size

    def rows(self, layer: int, slots: torch.Tensor, span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' entries in ring order, [rows, kv_heads, size, head_dim] (transformers' layout): a view of
        the ring when `span` says the slots are that contiguous range, else one index_select."""
        if span is not None:
            return self.keys[layer][span].transpose(1, 2), self.values[layer][span].transpose(1, 2)
        keys = self.keys[layer].index_select(0, slots)
        return keys.transpose(1, 2), self.values[layer].index_select(0, slots).transpose(1, 2)

    def write(self, layer: int, slots: torch.Tensor, seen: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a forward's new keys and values ([rows, kv_heads, new, head_dim], positions seen..seen+new-1)
        in place; only the last `size` of them can be seen again."""
        new = min(k.shape[2], self.size)
        first = seen + k.shape[2] - new
        index = (slots[:, None], (first[:, None] + torch.arange(new, device=seen.device)) % self.size)
        self.keys[layer].index_put_(index, k[:, :, -new:].transpose(1, 2))
        self.values[layer].index_put_(index, v[:, :, -new:].transpose(1, 2))


class RingView:
    """What transformers' attention layers call as their cache for one forward of `new` positions a row.

    Steady forwards (`new <= ring.step`): `update` writes the new keys and values into the ring, then returns
    the rows' ring entries (a view when `span` is given: the rows' slots are span.start, span.start + 1, ...).
    Longer forwards (prompts, possibly longer than the window): `update` returns the ring entries followed by
    the new keys (a fresh forward: the new keys alone), and `commit` writes them after. `mask` matches what
    `update` returns."""

    def __init__(
        self,
        ring: Ring,
        slots: torch.Tensor,
        seen: torch.Tensor,
        new: int,
        span: slice | None = None,
        fresh: bool = False,
        writes: torch.Tensor | None = None,
    ) -> None:
        """`fresh`: every row starts at position 0 (its stream's first forward), so its ring holds nothing it
        may see: a longer forward then attends over its own keys only, not over the whole ring masked out
        (at a 32-stream join, the decoder's ring is thousands of positions a row, which transformers would
        also expand to every query head)."""
        self.ring, self.slots, self.seen, self.span = ring, slots, seen, span
        self.writes = slots if writes is None else writes
        """[rows] the slot each row's keys and values are written to (a row that only fills the step, reading a
        stream's slot, writes to the scratch slot): by default the slot it reads."""
        self.in_place = new <= ring.step
        self.fresh = fresh and not self.in_place
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_place:
            self.ring.write(layer_idx, self.writes, self.seen, key_states, value_states)
            return self.ring.rows(layer_idx, self.slots, self.span)
        self.new[layer_idx] = (key_states, value_states)
        if self.fresh:
            return key_states, value_states
        past_k, past_v = self.ring.rows(layer_idx, self.slots, self.span)
        return torch.cat([past_k, key_states], dim=2), torch.cat([past_v, value_states], dim=2)

    def mask(self, new: int) -> torch.Tensor:
        """[rows, 1, new, keys] boolean: which keys each new query sees (written, causal, in window)."""
        steps = torch.arange(new, device=self.seen.device)
        queries = self.seen[:, None] + steps
        if self.in_place:
            keys = self.ring.positions(self.seen + new)
        elif self.fresh:
            keys = queries
        else:
            keys = torch.cat([self.ring.positions(self.seen), queries], dim=1)
        keys, queries = keys[:, None, :], queries[:, :, None]
        seen = (keys >= 0) & (keys <= queries) & (keys > queries - self.ring.window)
        return seen[:, None]

    def commit(self) -> None:
        """Write every layer's new keys and values into the ring (longer forwards; steady ones wrote already)."""
        for layer, (k, v) in self.new.items():
            self.ring.write(layer, self.writes, self.seen, k, v)
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
            Ring.allocate(model.config.audio_config, slots, device, dtype, int(model.config.downsample_factor)),
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
