"""The slot cache's arithmetic and moves: the few step shapes (`batch_sizes`, `padded`, `width_of`, `widths`),
how many slots a budget holds (`plan`), and `SlotCache` writing exactly the positions asked, no more."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app.model.compute.slots import (
    MIN_WIDTH,
    CachePlan,
    CacheShape,
    SlotCache,
    batch_sizes,
    padded,
    plan,
    width_of,
    widths,
)

SHAPE = CacheShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)


@pytest.mark.parametrize(
    ("max_rows", "sizes"),
    [
        (32, (1, 2, 4, 8, 16, 24, 32)),
        (5, (1, 2, 4, 5)),
        (1, (1,)),
        (2, (1, 2)),
        (8, (1, 2, 4, 8)),
        (30, (1, 2, 4, 8, 16, 24, 30)),
        (48, (1, 2, 4, 8, 16, 24, 32, 40, 48)),
    ],
)
def test_batch_sizes_are_vllms_capture_sizes_up_to_the_row_cap(max_rows: int, sizes: tuple[int, ...]) -> None:
    assert batch_sizes(max_rows) == sizes


@given(st.integers(1, 300))
def test_every_row_count_pads_to_the_smallest_size_that_holds_it(max_rows: int) -> None:
    sizes = batch_sizes(max_rows)
    assert sizes[-1] == max_rows and list(sizes) == sorted(set(sizes))
    for rows in range(1, max_rows + 1):
        size = padded(rows, sizes)
        assert size in sizes and size >= rows
        assert all(s < rows for s in sizes if s < size)


def test_padded_examples() -> None:
    sizes = batch_sizes(32)
    assert [padded(r, sizes) for r in (1, 2, 3, 5, 8, 9, 17, 25, 32)] == [1, 2, 4, 8, 8, 16, 24, 32, 32]
    with pytest.raises(StopIteration):
        padded(33, sizes)


@pytest.mark.parametrize(
    ("max_len", "expected"),
    [
        (32768, (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)),
        (1000, (128, 192, 256, 384, 512, 768, 1000)),
        (600, (128, 192, 256, 384, 512, 600)),
        (256, (128, 192, 256)),
        (128, (128,)),
        (100, (100,)),
    ],
)
def test_widths_are_two_a_doubling_from_128_and_max_len_itself(max_len: int, expected: tuple[int, ...]) -> None:
    assert widths(max_len) == expected


def test_width_of_examples() -> None:
    examples = (0, 1, 127, 128, 129, 192, 193, 256, 257, 385, 5000, 32768)
    assert [width_of(p, 32768) for p in examples] == [128, 128, 128, 128, 192, 192, 256, 256, 384, 512, 6144, 32768]
    assert [width_of(p, 1000) for p in (1, 129, 513, 769, 1000)] == [128, 192, 768, 1000, 1000]
    assert width_of(50, 100) == 100  # a cache shorter than MIN_WIDTH: its one width


@given(st.integers(1, 40000), st.data())
def test_width_of_is_the_smallest_listed_width_that_holds_the_positions(max_len: int, data: st.DataObject) -> None:
    positions = data.draw(st.integers(1, max_len))
    width = width_of(positions, max_len)
    listed = widths(max_len)
    assert width in listed and positions <= width <= max_len
    assert all(w < positions for w in listed if w < width)
    assert width == MIN_WIDTH or width == max_len or 2 * width < 3 * positions  # at most half again the row
    assert list(listed) == sorted(set(listed)) and listed[-1] == max_len


def test_cache_shape_counts_keys_and_values_of_every_layer() -> None:
    config = SimpleNamespace(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64, num_hidden_layers=3
    )
    shape = CacheShape.of(config, torch.bfloat16)
    assert shape == CacheShape(3, 2, 16, torch.bfloat16)
    assert shape.token_bytes == 2 * 3 * 2 * 16 * 2
    bare = SimpleNamespace(
        num_attention_heads=4, num_key_value_heads=None, head_dim=None, hidden_size=64, num_hidden_layers=1
    )
    assert CacheShape.of(bare, torch.float32) == CacheShape(1, 4, 16, torch.float32)  # no GQA, no head_dim: derived
    assert CachePlan(slots=3, max_len=10).bytes(shape) == 4 * 10 * shape.token_bytes  # the scratch slot too


def test_plan_fills_the_budget_scratch_slot_included_and_caps_at_max_rows() -> None:
    per_slot = 1024 * SHAPE.token_bytes
    assert plan(SHAPE, 32, 1024, 9 * per_slot) == CachePlan(8, 1024)
    assert plan(SHAPE, 32, 1024, 9 * per_slot + per_slot - 1) == CachePlan(8, 1024)  # whole slots only
    assert plan(SHAPE, 4, 1024, 9 * per_slot) == CachePlan(4, 1024)
    assert plan(SHAPE, 32, 1024, 2 * per_slot) == CachePlan(1, 1024)
    assert plan(SHAPE, 32, 1024, 2 * per_slot).bytes(SHAPE) <= 2 * per_slot


@pytest.mark.parametrize("budget_slots", [0, 1, 1.99])
def test_plan_refuses_a_budget_below_one_slot_and_says_what_to_change(budget_slots: float) -> None:
    per_slot = 1024 * SHAPE.token_bytes
    with pytest.raises(ValueError, match="--context-length") as raised:
        plan(SHAPE, 32, 1024, int(budget_slots * per_slot))
    assert "--max-model-len" in str(raised.value) and "1024 positions" in str(raised.value)


def _cache(slots: int = 3, max_len: int = 512) -> SlotCache:
    """A cache whose every position holds NaN, as never-written memory may: what `ready` must zero shows."""
    cache = SlotCache(SHAPE, CachePlan(slots, max_len), [torch.device("cpu")] * SHAPE.layers)
    for buffer in (*cache.keys, *cache.values):
        buffer.fill_(float("nan"))
    return cache


def _buffers(cache: SlotCache) -> list[torch.Tensor]:
    return [*cache.keys, *cache.values]


def test_a_cache_holds_its_slots_and_a_scratch_slot_on_each_layers_device() -> None:
    cache = _cache(slots=3, max_len=512)
    assert cache.scratch == cache.slots == 3 and cache.max_len == 512 and cache.zeroed == [0] * 4
    assert len(cache.keys) == len(cache.values) == SHAPE.layers
    assert all(b.shape == (4, 2, 512, 4) and b.dtype == torch.float32 for b in _buffers(cache))


def test_ready_zeroes_only_the_new_positions_of_the_slots_read_and_never_shrinks() -> None:
    cache = _cache()
    cache.ready(128, 2)  # a step of 2 rows reads slots 0 and 1 up to 128
    assert cache.zeroed == [128, 128, 0, 0]
    for buffer in _buffers(cache):
        assert bool((buffer[:2, :, :128] == 0).all()) and bool(buffer[:2, :, 128:].isnan().all())
        assert bool(buffer[2:].isnan().all())  # slots no step read stay untouched
    for buffer in _buffers(cache):
        buffer[1, :, 5] = 7.0  # a row's history: a later `ready` must keep it
    cache.ready(256, 3)
    assert cache.zeroed == [256, 256, 256, 0]
    for buffer in _buffers(cache):
        assert bool((buffer[1, :, 5] == 7.0).all())
        assert bool((buffer[:3, :, 128:256] == 0).all()) and bool(buffer[:, :, 256:].isnan().all())
        buffer[0, :, 200] = 3.0
    cache.ready(128, 3)
    cache.ready(256, 3)
    assert cache.zeroed == [256, 256, 256, 0]
    for buffer in _buffers(cache):
        assert bool((buffer[0, :, 200] == 3.0).all()) and bool((buffer[1, :, 5] == 7.0).all())
        assert bool(buffer[:, :, 256:].isnan().all())


def _history(length: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: keys and values [kv_heads, length, head_dim], as a prefill returns them."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, length, 4, generator=g), torch.randn(2, length, 4, generator=g)) for _ in range(SHAPE.layers)
    ]


def test_place_writes_positions_below_the_length_of_that_slot_only() -> None:
    cache = _cache()
    history = _history(150, seed=0)
    cache.place(1, history)
    assert cache.zeroed == [0, 150, 0, 0]  # finite below 150 in slot 1: what was written
    for layer, (k, v) in enumerate(history):
        assert torch.equal(cache.keys[layer][1, :, :150], k)
        assert torch.equal(cache.values[layer][1, :, :150], v)
    for buffer in _buffers(cache):
        assert bool(buffer[1, :, 150:].isnan().all()) and bool(buffer[[0, 2, 3]].isnan().all())
    ready = width_of(151, cache.max_len)
    cache.ready(ready, 2)  # the step after it zeroes past the history, never over it
    for layer, (k, _) in enumerate(history):
        assert torch.equal(cache.keys[layer][1, :, :150], k)
    for buffer in _buffers(cache):
        assert bool((buffer[1, :, 150:ready] == 0).all()) and bool((buffer[0, :, :ready] == 0).all())
        assert bool(buffer[:, :, ready:].isnan().all())


def test_copy_moves_exactly_the_positions_asked_reading_before_writing() -> None:
    cache = _cache(slots=4)
    cache.ready(512, 5)
    for buffer in _buffers(cache):
        buffer.copy_(torch.randn(buffer.shape))
    before = [b.clone() for b in _buffers(cache)]
    cache.copy([0, 1, 3], [1, 0, 2], length=100)  # a swap: each target gets its source's old values
    for old, new in zip(before, _buffers(cache), strict=True):
        assert torch.equal(new[1, :, :100], old[0, :, :100]) and torch.equal(new[0, :, :100], old[1, :, :100])
        assert torch.equal(new[2, :, :100], old[3, :, :100])
        assert torch.equal(new[:, :, 100:], old[:, :, 100:])  # positions past the length untouched
        assert torch.equal(new[3], old[3]) and torch.equal(new[4], old[4])  # sources and scratch
    after = [b.clone() for b in _buffers(cache)]
    cache.copy([], [], length=100)
    assert all(torch.equal(a, b) for a, b in zip(after, _buffers(cache), strict=True))


def test_copy_fans_one_slot_out_to_several() -> None:
    cache = _cache(slots=4)
    cache.ready(512, 5)
    cache.place(2, _history(40, seed=1))
    before = [b.clone() for b in _buffers(cache)]
    cache.copy([2, 2], [0, 3], length=40)
    for old, new in zip(before, _buffers(cache), strict=True):
        assert torch.equal(new[0, :, :40], old[2, :, :40]) and torch.equal(new[3, :, :40], old[2, :, :40])
        assert torch.equal(new[:, :, 40:], old[:, :, 40:]) and torch.equal(new[1:3], old[1:3])
