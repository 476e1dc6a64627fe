"""The attention of the generator's prefills, whose masks are causal and nothing else.

A prefill's rows are right-padded and any cached prefix is the same length for every row of a pass
(app/model/compute/generate.py): each real query at position p sees exactly positions 0..p, so its mask is
causal, aligned to the lower right of the [queries, keys] square (a prefix-cache hit has more keys than
queries), which SDPA's own `is_causal` (aligned to the upper left) is not. Handed a mask, transformers' sdpa
attention expands the keys and values to every query head (`repeat_kv`) and a GPU runs its memory-efficient
kernel over the whole square. A forward that passes `CAUSAL` says its mask is that one; the wrapper registered
here as transformers' "sdpa" then:

- on CUDA where the flash kernel takes the inputs (bfloat16 or float16, compute capability 8.0 on, a head size
  the kernel takes): calls it causal, which for flash means aligned to the lower right, the KV heads read in
  place and the mask unread (half the square, no copy of the keys);
- on a CPU: calls SDPA with the KV heads in place (`enable_gqa`) and the mask, or causal with no mask where
  the square has no cached prefix (SDPA's own `is_causal` is then that mask, and its kernel skips what it
  masks);
- elsewhere (a GPU without flash for these inputs, whose memory-efficient kernel takes no grouped heads and
  whose math kernel would materialise every score): transformers' own sdpa attention, the mask as given.

Without `CAUSAL`, every call is transformers' own sdpa attention, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAUSAL = "voxtral_causal"
"""The keyword argument of a language model forward whose attention mask is causal, aligned to the lower right,
for every real query (rows right-padded, any cached prefix the same length for all)."""


def flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor | None:
    """CUDA's flash kernel, causal aligned to the lower right, KV heads in place: [rows, heads, queries, head
    size]; None where it does not take these inputs. torch's `causal_lower_right` bias calls the same op (a
    tensor subclass, which cannot be made while a dispatch mode such as a profiler's is active)."""
    if query.device.type != "cuda" or query.shape[-1] % 8:
        return None
    if not can_use_flash_attention(SDPAParams(query, key, value, None, 0.0, False, True), False):
        return None
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal=True, scale=scale)
    attended: torch.Tensor = out[0]
    return attended


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
    """transformers' sdpa attention, or with `CAUSAL` set, the kernels above."""
    if kwargs.pop(CAUSAL, False) and attention_mask is not None and not dropout:
        attended = flash(query, key, value, scaling)
        if attended is None and query.device.type == "cpu":
            grouped, square = key.shape[1] != query.shape[1], key.shape[2] == query.shape[2]
            attended = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=None if square else attention_mask,  # square: SDPA's own causal is that mask
                is_causal=square,
                scale=scaling,
                enable_gqa=grouped,
            )
        if attended is not None:
            return attended.transpose(1, 2).contiguous(), None
    out: tuple[torch.Tensor, None] = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    return out


def install() -> None:
    """Register `sdpa` as transformers' "sdpa" attention (idempotent)."""
    AttentionInterface.register("sdpa", sdpa)
