"""The stream rings' attention (app/model/realtime/pool.py): a forward that writes its keys into the ring first
and attends over the ring in ring order, masked by absolute position, sees what attention over the window's
keys oldest first sees (float summation order differs: a stated tolerance), whether the rows' slots are read as
one view (`span`) or gathered, for steady forwards and for prompts longer than the window."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from app.model.realtime.pool import Ring, RingView

WINDOW, HEADS, DIM = 6, 2, 8
TOLERANCE = 1e-5


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, new: int) -> torch.Tensor:
    """One row: queries at start..start+new-1 over positions (p - WINDOW, p], oldest first."""
    first = max(0, start - WINDOW + 1)
    k, v = keys[:, first : start + new], values[:, first : start + new]
    positions = torch.arange(first, start + new)
    queries = torch.arange(start, start + new)[:, None]
    mask = (positions <= queries) & (positions > queries - WINDOW)
    return _attend(q, k[None], v[None], mask[None, None])[0]


@pytest.mark.parametrize(("step", "plan"), [(1, [9, 1, 1, 1, 1, 1, 1, 1]), (4, [4, 4, 4, 4]), (4, [3, 4, 4, 4])])
@pytest.mark.parametrize("span", [True, False])
def test_ring_attention_equals_the_window_oldest_first(step: int, plan: list[int], span: bool) -> None:
    torch.manual_seed(0)
    rows, slots = 3, torch.tensor([1, 2, 3]) if span else torch.tensor([3, 0, 2])
    config = SimpleNamespace(sliding_window=WINDOW, num_key_value_heads=HEADS, head_dim=DIM, num_hidden_layers=1)
    ring = Ring.allocate(config, 4, torch.device("cpu"), torch.float32, step)
    total = sum(plan)
    keys, values = torch.randn(rows, HEADS, total, DIM), torch.randn(rows, HEADS, total, DIM)
    seen = 0
    for new in plan:  # the first forward is the prompt (longer than the window in the first case)
        q = torch.randn(rows, HEADS, new, DIM)
        view = RingView(ring, slots, torch.full((rows,), seen), new, slice(1, 4) if span else None)
        mask = view.mask(new)
        k, v = view.update(keys[:, :, seen : seen + new], values[:, :, seen : seen + new], 0)
        got = _attend(q, k, v, mask)
        view.commit()
        for row in range(rows):
            want = _reference(q[row], keys[row], values[row], seen, new)
            torch.testing.assert_close(got[row], want, atol=TOLERANCE, rtol=TOLERANCE)
        seen += new


@pytest.mark.parametrize("first", [3, 9])
def test_a_fresh_first_forward_attends_over_its_own_keys_only(first: int) -> None:
    """A stream's first forward (`fresh`: every row at position 0) sees the same as over the ring (which holds
    nothing it may see), reading only its own keys: what the attention is handed is `first` positions long,
    not the ring's size plus them; what it writes is what later forwards read."""
    torch.manual_seed(1)
    rows, slots = 2, torch.tensor([2, 0])
    config = SimpleNamespace(sliding_window=WINDOW, num_key_value_heads=HEADS, head_dim=DIM, num_hidden_layers=1)
    rings = [Ring.allocate(config, 3, torch.device("cpu"), torch.float32, 1) for _ in range(2)]
    for ring in rings:  # an earlier stream's leftovers in the slots: masked by position either way
        ring.keys[0].normal_()
        ring.values[0].normal_()
    total = first + 3
    keys, values = torch.randn(rows, HEADS, total, DIM), torch.randn(rows, HEADS, total, DIM)
    plan = (first, 1, 1, 1)
    queries = [torch.randn(rows, HEADS, new, DIM) for new in plan]
    got = []
    for ring, fresh in zip(rings, (True, False), strict=True):
        seen, outs = 0, []
        for new, q in zip(plan, queries, strict=True):
            view = RingView(ring, slots, torch.full((rows,), seen), new, fresh=fresh and seen == 0)
            mask = view.mask(new)
            k, v = view.update(keys[:, :, seen : seen + new], values[:, :, seen : seen + new], 0)
            if fresh and seen == 0:
                assert k.shape[2] == v.shape[2] == mask.shape[-1] == first
            outs.append(_attend(q, k, v, mask))
            view.commit()
            seen += new
        got.append(outs)
    for fresh_out, ring_out in zip(*got, strict=True):
        torch.testing.assert_close(fresh_out, ring_out, atol=TOLERANCE, rtol=TOLERANCE)
    for row in range(rows):
        want = _reference(queries[0][row], keys[row], values[row], 0, first)
        torch.testing.assert_close(got[0][0][row], want, atol=TOLERANCE, rtol=TOLERANCE)
