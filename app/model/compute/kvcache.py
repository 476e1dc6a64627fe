"""The prefill's KV cache: each layer's keys and values kept as the forward pass hands them over.

Decoding runs over the slot cache (app/model/compute/slots.py). A prefill is one forward pass of
transformers' modules, which write each layer's keys and values into a `Cache` once; `PrefillCache` keeps
those tensors as they are (no copy), for the generator to place in slots. transformers' `DynamicLayer`
would concatenate them onto a tensor it first builds from a Python list, an upload the host waits for on a
GPU, once a layer. `SlotPrefillCache` is the prefill of the rest of a prompt whose first tokens are cached
in its slot (app/model/compute/prefix.py): it writes into the slot and attends over it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from app.model.compute.transfer import upload


class _Once(DynamicLayer):
    """A layer a prefill writes exactly once."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # transformers' DynamicLayer is untyped

    def _written(self, key_states: torch.Tensor) -> None:
        if self.is_initialized:
            raise NotImplementedError("a prefill writes each layer once")
        self.device, self.is_initialized = key_states.device, True


class _Kept(_Once):
    def __init__(self) -> None:
        super().__init__()
        self.written: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._written(key_states)
        self.keys, self.values = key_states, value_states
        self.written = (key_states, value_states)
        return key_states, value_states


class PrefillCache(DynamicCache):
    """A `DynamicCache` whose layers keep the one write of a prefill."""

    def __init__(self, num_layers: int) -> None:
        self.kept = [_Kept() for _ in range(num_layers)]
        Cache.__init__(self, layers=list(self.kept))

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (keys, values) of each layer, [rows, kv_heads, positions, head_dim]."""
        out = []
        for layer in self.kept:
            if layer.written is None:
                raise RuntimeError("a layer of the prefill was not written")
            out.append(layer.written)
        return out


class _Slotted(_Once):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, single: int, past: int) -> None:
        super().__init__()
        self.buffers = (keys, values)
        self.slots, self.single, self.past = slots, single, past
        self.end = past
        """Positions the slot holds once the layer is written."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._written(key_states)
        end = self.past + key_states.shape[-2]
        out = []
        for buffer, states in zip(self.buffers, (key_states, value_states), strict=True):
            if self.single >= 0:  # one row: its slot's positions are the attention's keys, a view
                buffer[self.single, :, self.past : end].copy_(states[0])
                out.append(buffer[self.single : self.single + 1, :, :end])
            else:
                buffer[:, :, self.past : end].index_copy_(0, self.slots, states)
                out.append(buffer[:, :, :end].index_select(0, self.slots))
        self.end = end  # not the tensors: several rows' are a gathered copy, which would live until the pass ends
        return out[0], out[1]

    def get_seq_length(self) -> int:
        return self.end

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past + query_length, 0


class SlotPrefillCache(DynamicCache):
    """A prefill over a cached prefix: each layer's first `past` positions are already in the rows' slots
    of the slot cache; the forward pass's keys and values for positions `past`.. are written there, and
    attention reads the slot's positions (a view for one row, one gather for several)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: list[int], past: int) -> None:
        single = slots[0] if len(slots) == 1 else -1
        index: dict[torch.device, torch.Tensor] = {}
        for k in keys:  # once per device
            if k.device not in index:
                index[k.device] = upload(slots, k.device, torch.long)
        self.kept = [_Slotted(k, v, index[k.device], single, past) for k, v in zip(keys, values, strict=True)]
        Cache.__init__(self, layers=list(self.kept))
