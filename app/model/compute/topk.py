"""The k largest scores of each row: on a CPU, by a two-level search cheaper than `torch.topk`.

Why: truncated sampling (top_p, top_k, min_p) and log-probs' alternatives start from each row's 32 (or
`top_logprobs`) best tokens, every step; this returns the same values at about half the cost on a CPU
(docs/PERF.md#model-topk).

How, and why it is exact: each row is cut into blocks of `BLOCK` scores. A token among the row's k largest
is at least the k-th largest value, so its block's maximum is too: that block is among the k blocks with
the largest maxima (each block's maximum is a distinct token). The k largest of those k x BLOCK scores are
the row's k largest. Equal scores may come back under other ids than `torch.topk` gives (it does not order
ties either); the values, and any id whose score is unique, are the same.

`torch.topk` as it is: on a GPU, beyond `MOST` (the sampler's larger tiers), for a vocabulary that does not
split into at least 4k blocks, and for non-contiguous scores (the weight-major logits of a few rows,
app/model/compute/generate.py).
"""

from __future__ import annotations

import torch

BLOCK = 128
"""Scores per block: 1,024 blocks at 131,072 tokens (other sizes: docs/PERF.md#model-topk)."""
MOST = 64
"""The largest k taken by blocks; the sampler's wider tiers (1,024, the whole vocabulary) use torch.topk."""


def topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest scores of each row of `scores` (rows, vocab), in descending order."""
    rows, vocab = scores.shape
    if not _blockwise(scores, k):
        values, ids = scores.topk(k, dim=-1)
        return values, ids
    blocks = scores.view(rows, vocab // BLOCK, BLOCK)
    best_blocks = blocks.amax(-1).topk(k, dim=-1).indices
    picked = blocks.gather(1, best_blocks.unsqueeze(-1).expand(rows, k, BLOCK)).view(rows, k * BLOCK)
    values, where = picked.topk(k, dim=-1)
    return values, best_blocks.gather(1, where // BLOCK) * BLOCK + where % BLOCK


def _blockwise(scores: torch.Tensor, k: int) -> bool:
    vocab = scores.shape[1]
    fits = vocab % BLOCK == 0 and vocab // BLOCK >= 4 * k
    return scores.device.type == "cpu" and 0 < k <= MOST and fits and scores.is_contiguous()
