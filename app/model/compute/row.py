"""One request while the model holds it: its prompt, its audio, what it generated, how it samples."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from app.model.compute.transfer import upload
from app.types import Constraint, SamplingParams, TokenLogprob


@dataclass(eq=False)
class Row:
    """Compared by identity: two rows with the same prompt are still two requests."""

    input_ids: list[int]
    audios: list[np.ndarray]
    sampling: SamplingParams
    generated: list[int] = field(default_factory=list)
    rng: random.Random | None = None
    """One uniform draw a step for a sampled row, from its own generator: a seeded row draws the same
    numbers, and so the same tokens, alone and in any batch."""
    key: int = -1
    """Opaque to the model: whoever runs the row uses it to find the request it answers (the engine: its
    work item). -1: none (a row made outside the engine)."""
    constraint: Constraint | None = None
    index: int = 0
    """Which of its request's `n` choices this row decodes."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per generated token, when the request asked for log-probs."""
    cache_salt: str | None = None
    """Prefix caching (app/model/compute/prefix.py): None shares cached prefixes with every row of the model; a
    string only with rows of the same salt (vLLM's `cache_salt`)."""
    cached_tokens: int = 0
    """Set by the generator: prompt tokens its first prefill took from the prefix cache instead of computing."""

    def __post_init__(self) -> None:
        if self.sampling.temperature > 0 and self.rng is None:
            seed = self.sampling.seed  # choice i of `n` draws with seed + i: independent, reproducible
            self.rng = random.Random(seed + self.index) if seed is not None else random.Random()


def take_rows(scores: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
    """Rows `index` of a batch's `scores`: the tensor itself when that is all of them, in order (no 16 MB
    copy at 32 x 131,072 logits)."""
    if list(index) == list(range(scores.shape[0])):
        return scores
    return scores.index_select(0, upload(list(index), scores.device, torch.long))
