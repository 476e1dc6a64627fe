"""The prefill's KV cache: each layer's keys and values kept as the forward pass hands them over.

Decoding runs over the slot cache (app/model/compute/slots.py). A prefill is one forward pass of
transformers' modules, which write each layer's keys and values into a `Cache` once; `PrefillCache` keeps
those tensors as they are (no copy), for the generator to place in slots. transformers' `DynamicLayer`
would concatenate them onto a tensor it first builds from a Python list, an upload the host waits for on a
GPU, once a layer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class _Kept(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # transformers' DynamicLayer is untyped
        self.written: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_initialized:
            raise NotImplementedError("a prefill writes each layer once")
        self.device, self.is_initialized = key_states.device, True
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
