"""The KV cache decoding runs over: allocated once, one slot of `max_len` positions a row.

Each layer keeps keys and values in one buffer, [slots + 1, 2 x kv_heads, max_len, head_dim]: the keys' heads
then the values' (head-major, as transformers' static cache: attention reads each head's positions as one
contiguous run, and a prefill's [kv_heads, length, head_dim] goes in without a transpose; one buffer, so a
decode step writes a row's keys and values with one `index_put_`). `keys[i]` and `values[i]` are its two
halves, views. A row holds one slot, its position p at index p,
from the prefill that placed it until it leaves. Rows join and leave
by slot index: nothing is regathered or reallocated while the server runs, and a decode step reads the
first `rows` slots as a view (the step runs in slot order, `padded` rows wide). The last slot is scratch:
padding rows of a step write there, so they never touch a slot a row holds.

Positions a step reads but no row wrote must hold finite numbers (masked attention multiplies them by 0,
and 0 x NaN is NaN). `ready(width, slots)` zeroes the slots a step reads up to its width, once, where
nothing was written: the cache is allocated untouched, so a CPU process holds only what its steps read
(about what the running-token budget allows), not the whole allocation.

How many slots fit is a plan from a byte budget (`plan`), as vLLM sizes its cache from
`--gpu-memory-utilization`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from app.model.compute.transfer import upload

MIN_WIDTH = 128
"""The fewest positions a step reads (`widths`)."""


def batch_sizes(max_rows: int) -> tuple[int, ...]:
    """The row counts a step is padded to: vLLM's capture sizes 1, 2, 4, 8, 16, 24, 32, ... up to `max_rows`,
    which is always one of them."""
    sizes = [s for s in (1, 2, 4) if s < max_rows] + list(range(8, max_rows, 8))
    return (*sizes, max_rows)


def padded(rows: int, sizes: Sequence[int]) -> int:
    """The smallest size in `sizes` that holds `rows`."""
    return next(size for size in sizes if size >= rows)


def width_of(positions: int, max_len: int) -> int:
    """The positions a step reads for rows whose longest has `positions` (the new token's included): the
    smallest of `widths(max_len)` that holds them."""
    return next(width for width in widths(max_len) if width >= min(positions, max_len))


@functools.cache
def widths(max_len: int) -> tuple[int, ...]:
    """The widths a step reads: 128, 192, 256, 384, 512, 768, ... (two a doubling, so a step reads at most
    half again what its longest row holds, 20 % on average), up to `max_len`, which is always one."""
    out: list[int] = []
    width = MIN_WIDTH
    while width < max_len:
        out += [width] + ([width * 3 // 2] if width * 3 // 2 < max_len else [])
        width *= 2
    return (*out, max_len)


@dataclass(frozen=True)
class CacheShape:
    """What one position of one row costs in every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def token_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, text_config: Any, dtype: torch.dtype) -> CacheShape:
        heads = int(text_config.num_attention_heads)
        head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
        kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        return cls(int(text_config.num_hidden_layers), kv_heads, int(head_dim), dtype)

    def per_rank(self, ranks: int) -> CacheShape:
        """What one of `ranks` tensor-parallel ranks holds: its share of the KV heads (transformers' `tp_plan`
        splits k_proj and v_proj by output rows, so each rank keeps `kv_heads / ranks` heads)."""
        if self.kv_heads % ranks:
            raise ValueError(f"{self.kv_heads} KV heads do not split evenly over {ranks} tensor-parallel ranks")
        return replace(self, kv_heads=self.kv_heads // ranks)


@dataclass(frozen=True)
class CachePlan:
    slots: int
    """Rows that can decode at once."""
    max_len: int
    """Positions each row may reach (prompt, audio and output)."""

    def bytes(self, shape: CacheShape) -> int:
        return (self.slots + 1) * self.max_len * shape.token_bytes


def plan(shape: CacheShape, max_rows: int, max_len: int, budget_bytes: int) -> CachePlan:
    """As many slots of `max_len` positions as `budget_bytes` holds (the scratch slot included), at most
    `max_rows`. Raises ValueError when not even one fits, with what to change."""
    per_slot = max_len * shape.token_bytes
    slots = min(max_rows, budget_bytes // per_slot - 1)
    if slots < 1:
        raise ValueError(
            f"the KV cache budget ({budget_bytes / 2**30:.2f} GiB) does not hold two slots of {max_len} positions "
            f"({per_slot / 2**30:.2f} GiB each): lower --context-length (--max-model-len) or raise "
            "--gpu-memory-utilization (--kv-cache-memory-bytes on a CPU)"
        )
    return CachePlan(slots, max_len)


def layer_devices(model: Any) -> list[torch.device]:
    """The device of each decoder layer of a Voxtral model: where its part of the cache goes."""
    layers = model.model.language_model.layers[: int(model.config.text_config.num_hidden_layers)]
    return [layer.self_attn.q_proj.weight.device for layer in layers]


class SlotCache:
    """Keys and values of every layer, on each layer's device (`devices`)."""

    def __init__(self, shape: CacheShape, cache_plan: CachePlan, devices: Sequence[torch.device]) -> None:
        size = (cache_plan.slots + 1, 2 * shape.kv_heads, cache_plan.max_len, shape.head_dim)
        self.kv = [torch.empty(size, dtype=shape.dtype, device=device) for device in devices]
        """Each layer's one buffer: heads 0..kv_heads-1 its keys, the rest its values."""
        self.keys = [buffer[:, : shape.kv_heads] for buffer in self.kv]
        self.values = [buffer[:, shape.kv_heads :] for buffer in self.kv]
        self.slots = cache_plan.slots
        self.scratch = cache_plan.slots
        """The slot padding rows write to; never read as a row's history."""
        self.max_len = cache_plan.max_len
        self.zeroed = [0] * (cache_plan.slots + 1)
        """Each slot holds finite numbers below this position (written there, or zeroed)."""

    def ready(self, width: int, slots: int) -> None:
        """Make positions below `width` of the first `slots` slots safe to read, zeroing only what was never
        written: a process holds the positions its steps read, not the whole allocation."""
        todo = [s for s in range(slots) if self.zeroed[s] < width]
        for start, group in _runs(todo, self.zeroed):
            for buffer in self.kv:
                buffer[group[0] : group[-1] + 1, :, start:width].zero_()
            for slot in group:
                self.zeroed[slot] = width

    def place(self, slot: int, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A row's history (per layer: keys and values [kv_heads, length, head_dim]) into positions 0.. of `slot`."""
        length = layers[0][0].shape[-2]
        for keys, values, (k, v) in zip(self.keys, self.values, layers, strict=True):
            keys[slot, :, :length].copy_(k)
            values[slot, :, :length].copy_(v)
        self.zeroed[slot] = max(self.zeroed[slot], length)

    def copy(self, sources: Sequence[int], targets: Sequence[int], length: int) -> None:
        """Positions below `length` of slots `sources` into slots `targets` (read before any is written)."""
        if not sources:
            return
        index: dict[torch.device, torch.Tensor] = {}
        for buffer in self.kv:
            if buffer.device not in index:  # once per device, in one pinned copy: the host does not wait
                index[buffer.device] = upload(torch.tensor([list(sources), list(targets)]), buffer.device)
            pair = index[buffer.device]
            buffer[:, :, :length].index_copy_(0, pair[1], buffer[:, :, :length].index_select(0, pair[0]))
        zeroed = [self.zeroed[s] for s in sources]  # a source's unwritten positions copy as they are: not finite
        for slot, source in zip(targets, zeroed, strict=True):
            self.zeroed[slot] = max(self.zeroed[slot], length) if source >= length else source


def _runs(slots: list[int], zeroed: list[int]) -> list[tuple[int, list[int]]]:
    """`slots` (ascending) grouped into runs of consecutive slots zeroed up to the same position."""
    runs: list[tuple[int, list[int]]] = []
    for slot in slots:
        if runs and runs[-1][1][-1] == slot - 1 and runs[-1][0] == zeroed[slot]:
            runs[-1][1].append(slot)
        else:
            runs.append((zeroed[slot], [slot]))
    return runs
