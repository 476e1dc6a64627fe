"""The attention of a prefill that extends a cached prefix: new queries after `past` cached positions.

Each new query at position past + i sees positions 0..past + i: causal, aligned to the lower right of the
[queries, keys] square, which SDPA's `is_causal` (aligned to the upper left) is not. Handed a mask that says
so, transformers' sdpa attention expands the keys and values to every query head (`repeat_kv`: a mask rules out
SDPA's grouped-query mode on a GPU) and a GPU runs its memory-efficient kernel over the whole square. Given
`LOWER_RIGHT` in the forward's keyword arguments, the wrapper registered here as transformers' "sdpa" calls
SDPA with torch's `causal_lower_right` bias instead, the KV heads read in place: on a GPU the flash kernel
(lower-right causal is what it computes), on a CPU the same mask materialised. Without that keyword it is
transformers' own sdpa attention, unchanged, for every other caller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

LOWER_RIGHT = "voxtral_lower_right"
"""The keyword argument of a language model forward whose queries all follow the same cached prefix with no
padding among the keys (the rows right-padded): attend causally, aligned to the lower right."""


def sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, or with `LOWER_RIGHT` set, lower-right causal attention over grouped heads
    (the mask handed over, the same pattern, unread)."""
    if not kwargs.pop(LOWER_RIGHT, False):
        out: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
        return out
    attended = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=causal_lower_right(query.shape[2], key.shape[2]),
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return attended.transpose(1, 2).contiguous(), None


def install() -> None:
    """Register `sdpa` as transformers' "sdpa" attention (idempotent)."""
    AttentionInterface.register("sdpa", sdpa)
