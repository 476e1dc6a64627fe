"""The blockwise top-k returns torch.topk's values, and the ids of those values, at the real vocabulary size:
random rows, rows masked down to a few allowed tokens, rows full of ties, and the cases it leaves to torch."""

from __future__ import annotations

import pytest
import torch

from app.model.compute.topk import BLOCK, MOST, topk

VOCAB = 131_072


def _rows(kind: str, rows: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(kind))
    scores = torch.randn(rows, VOCAB, generator=g) * 4
    if kind == "masked":  # a grammar allows a handful of tokens, scattered over the vocabulary
        allowed = torch.rand(rows, VOCAB, generator=g) < 5 / VOCAB
        scores = torch.where(allowed, scores, torch.tensor(float("-inf")))
    if kind == "ties":  # few distinct values: every top-k crosses ties
        scores = scores.round()
    if kind == "one_block":  # all the best tokens in one block
        scores[:, 640 : 640 + BLOCK] += 100
    return scores.contiguous()


@pytest.mark.parametrize("kind", ["random", "masked", "ties", "one_block"])
@pytest.mark.parametrize("k", [1, 5, 32, MOST])
def test_the_same_values_as_torch_and_ids_that_hold_them(kind: str, k: int) -> None:
    scores = _rows(kind)
    values, ids = topk(scores, k)
    expected_values, expected_ids = scores.topk(k, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(scores.gather(1, ids), values)  # each id holds its value
    for row in range(scores.shape[0]):
        assert len(set(ids[row].tolist())) == k  # no id twice
    if kind == "random":  # no ties among the best: the very same ids, in the same order
        assert torch.equal(ids, expected_ids)


@pytest.mark.parametrize(
    "scores, k",
    [
        (torch.randn(4, 2_000), 32),  # the 2,000-token model: not a whole number of blocks
        (torch.randn(4, VOCAB), MOST + 1),  # a wider tier
        (torch.randn(VOCAB, 4).T, 32),  # column-major logits (the weight-major projection)
    ],
    ids=["small-vocab", "wide-k", "non-contiguous"],
)
def test_what_it_leaves_to_torch_is_torch_exactly(scores: torch.Tensor, k: int) -> None:
    values, ids = topk(scores, k)
    expected_values, expected_ids = scores.topk(k, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)
