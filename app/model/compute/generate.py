"""Batched generation with per-row sampling, over the real transformers forward pass.

`model.generate` forces one parameter set per batch and cannot take new rows mid-flight, so
the decode loop lives here: prefill a group of rows (left-padded, explicit positions), step
all running rows with the KV cache, sample each row with its own parameters, drop finished
rows and merge freshly prefilled ones in between steps. Left padding with zeroed attention
keeps every row's output identical to running it alone.

The output projection (hidden -> vocabulary logits) is taken here, after the decoder, so that a CPU model can
project 2 to `WEIGHT_MAJOR_ROWS` rows weight-major, `W @ h.T`, where that CPU's kernels make it clearly faster
than `lm_head`'s `F.linear`. Which one wins differs between CPUs, so it is measured when the model loads
(`weight_major_pays`; docs/PERF.md#model-weight-major-projection). Its logits are column-major: cheap to reduce
for a few rows, not for many. One row keeps `lm_head` (bit-equal to `model.generate`). Float32 only: its logits
differ from `F.linear`'s by ~1e-6 relative, far inside the gaps the parity tests decide on; bfloat16 keeps
`lm_head`, whose near-ties are one bfloat16 step apart and whose kernels differ between CPUs. On a GPU,
`lm_head` as it is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.model.compute.features import LogMel
from app.model.compute.kvcache import GrowingCache, assemble, gather
from app.model.compute.row import Row
from app.model.compute.sampling import sample
from app.model.compute.transfer import upload

__all__ = ["BatchGenerator", "BatchState", "Row", "sample"]

WEIGHT_MAJOR_ROWS = 8
"""The most rows projected weight-major on a CPU (module docstring)."""
WEIGHT_MAJOR = "weight-major"
"""The variant a weight-major CPU model adds to its `system_fingerprint` (app/model/fingerprint.py)."""
WEIGHT_MAJOR_GAIN = 0.8
"""Weight-major is taken only if it costs at most this fraction of `F.linear` when measured at load: where the
two are close, `lm_head` (the model's own call) is kept, and timing noise cannot flip the choice."""


def weight_major_pays(weight: torch.Tensor, rows: int = 4, repeats: int = 5) -> bool:
    """Whether, on this CPU, `rows` rows project with `W @ h.T` (and a host argmax of each row, as the sampler
    takes it) clearly faster than with `F.linear`: the best of `repeats` timings of each, taking turns."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    hidden = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=weight.dtype)

    def linear() -> None:
        [row.argmax() for row in torch.nn.functional.linear(hidden, weight).numpy()]

    def major() -> None:
        [row.argmax() for row in (weight @ hidden.T).T.numpy()]

    best = {linear: float("inf"), major: float("inf")}
    with torch.inference_mode():
        for _ in range(repeats):
            for way in best:
                started = time.perf_counter()
                way()
                best[way] = min(best[way], time.perf_counter() - started)
    return best[major] <= WEIGHT_MAJOR_GAIN * best[linear]


@dataclass
class BatchState:
    """KV cache and bookkeeping of the rows currently being decoded (same order as `rows`)."""

    rows: list[Row]
    cache: GrowingCache
    attention_mask: torch.Tensor
    """[rows, width] on the device: each row's history is right-aligned, zeros (padding) on its left."""
    next_positions: torch.Tensor
    lengths: list[int]
    """The host's copy of `next_positions`: each row's tokens in the cache, so the padding of
    `attention_mask` is known without reading it back from the device."""


class BatchGenerator:
    """Stateless over requests: owns the model and turns rows into logits."""

    def __init__(self, model: Any, pad_token_id: int, log_mel: LogMel, weight_major: bool | None = None) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.text_config = model.config.text_config
        self.num_layers = int(self.text_config.num_hidden_layers)
        self.log_mel = log_mel
        if weight_major is None:
            weight_major = weight_major_pays(model.lm_head.weight)
        self.weight_major = weight_major and self.device.type == "cpu" and model.lm_head.weight.dtype == torch.float32
        """2 to WEIGHT_MAJOR_ROWS rows project with `W @ h.T` (see the module docstring); None: measured here."""

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Row]) -> tuple[BatchState, torch.Tensor]:
        """Run the prompts of `rows` (audio encoder included); return their state and next-token logits."""
        # A preempted row comes back with its generated tokens: recompute them as prompt.
        prompts = [r.input_ids + r.generated for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        audios = [audio for r in rows for audio in r.audios]
        features = self.log_mel.batch(audios).to(self.device, self.model.dtype) if audios else None
        lengths = [len(p) for p in prompts]
        mask_on_device = upload(mask, self.device)
        out = self.model.model(
            input_ids=upload(ids, self.device),
            input_features=features,
            attention_mask=self._mask(mask_on_device, lengths, width),
            position_ids=upload(positions, self.device),
            cache=GrowingCache(self.num_layers),
            use_cache=True,
        )
        state = BatchState(list(rows), out.cache, mask_on_device, upload(lengths, self.device, torch.long), lengths)
        return state, self.project(out.last_hidden_state[:, -1, :])

    @torch.inference_mode()
    def step(self, state: BatchState, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feed one sampled token per row (host ids are uploaded pinned, without a wait); return the next
        logits."""
        ones = torch.ones((len(state.rows), 1), dtype=state.attention_mask.dtype, device=self.device)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        state.lengths = [n + 1 for n in state.lengths]
        out = self.model.model(
            input_ids=upload(tokens, self.device, torch.long).view(-1, 1),
            attention_mask=self._mask(state.attention_mask, state.lengths, 1),
            position_ids=state.next_positions.view(-1, 1),
            cache=state.cache,
            use_cache=True,
        )
        state.cache = out.cache
        state.next_positions = state.next_positions + 1
        return self.project(out.last_hidden_state[:, -1, :])

    def _mask(self, mask: torch.Tensor, lengths: list[int], queries: int) -> torch.Tensor | None:
        """The attention mask handed to transformers for `queries` new positions, in the form its
        `create_causal_mask` builds from the 2D `mask`, decided on the host: given a 2D mask it asks the device
        whether there is padding (masking_utils' `fast_all` in an `if`, a sync every step). No padding: None,
        from which it builds what an all-ones mask gives. Padding, for sdpa and eager attention: their 4D
        mask, causal and padded, the same values (True, or 0, where a row attends). Other kernels: the 2D mask."""
        width = mask.shape[1]
        if min(lengths) == width:
            return None
        kind = getattr(self.model.config, "_attn_implementation", None)
        if kind not in ("sdpa", "eager"):
            return mask
        keys = torch.arange(width, device=mask.device)
        causal = keys.unsqueeze(0) <= torch.arange(width - queries, width, device=mask.device).unsqueeze(1)
        allowed = causal[None, None] & mask.bool()[:, None, None, :]
        if kind == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.where(allowed, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of each row's last hidden state ([rows, hidden] -> [rows, vocab])."""
        if self.weight_major and 1 < hidden.shape[0] <= WEIGHT_MAJOR_ROWS:
            weight: torch.Tensor = self.model.lm_head.weight
            return (weight @ hidden.T).T
        logits: torch.Tensor = self.model.lm_head(hidden)
        return logits.float()

    def select(self, state: BatchState, keep: list[int]) -> BatchState:
        """Keep only the rows at `keep`, and drop cache columns no remaining row attends to."""
        index = upload(keep, self.device, torch.long)
        mask = state.attention_mask.index_select(0, index)
        lengths = [state.lengths[i] for i in keep]
        start = mask.shape[1] - max(lengths) if lengths else 0  # the first column a kept row attends to
        cache = gather(state.cache, index, start)
        positions = state.next_positions.index_select(0, index)
        return BatchState([state.rows[i] for i in keep], cache, mask[:, start:], positions, lengths)

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        """One state for both groups: the shorter history is left-padded with masked zeros."""
        width = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
        cache = assemble([a.cache, b.cache], width)
        mask = torch.cat([_lpad_mask(a.attention_mask, width), _lpad_mask(b.attention_mask, width)])
        positions = torch.cat([a.next_positions, b.next_positions])
        return BatchState(a.rows + b.rows, cache, mask, positions, a.lengths + b.lengths)


def _lpad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (missing, 0))
