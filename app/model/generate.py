"""Batched generation with per-row sampling, over the real transformers forward pass.

`model.generate` forces one parameter set per batch and cannot take new rows mid-flight, so
the decode loop lives here: prefill a group of rows (left-padded, explicit positions), step
all running rows with the KV cache, sample each row with its own parameters, drop finished
rows and merge freshly prefilled ones in between steps. Left padding with zeroed attention
keeps every row's output identical to running it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.model.features import LogMel
from app.model.kvcache import GrowingCache, assemble, gather
from app.types import SamplingParams


@dataclass
class Row:
    """One request while the model holds it."""

    input_ids: list[int]
    audios: list[np.ndarray]
    sampling: SamplingParams
    generated: list[int] = field(default_factory=list)
    rng: torch.Generator | None = None
    owner: Any = None
    constraint: Any = None
    """An `app.types.Constraint`, or None."""
    """The engine's work item this row answers to."""

    def __post_init__(self) -> None:
        if self.sampling.temperature > 0:
            self.rng = torch.Generator()
            seed = self.sampling.seed
            self.rng.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))


@dataclass
class BatchState:
    """KV cache and bookkeeping of the rows currently being decoded (same order as `rows`)."""

    rows: list[Row]
    cache: GrowingCache
    attention_mask: torch.Tensor
    next_positions: torch.Tensor


class BatchGenerator:
    """Stateless over requests: owns the model and turns rows into logits."""

    def __init__(self, model: Any, pad_token_id: int, log_mel: LogMel) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.text_config = model.config.text_config
        self.num_layers = int(self.text_config.num_hidden_layers)
        self.log_mel = log_mel

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
        out = self.model(
            input_ids=ids.to(self.device),
            input_features=features,
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=GrowingCache(self.num_layers),
            use_cache=True,
            logits_to_keep=1,
        )
        lengths = torch.tensor([len(p) for p in prompts])
        state = BatchState(list(rows), out.cache, mask.to(self.device), lengths.to(self.device))
        return state, out.logits[:, -1, :].float()

    @torch.inference_mode()
    def step(self, state: BatchState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one sampled token per row; return the next logits."""
        ones = torch.ones((len(state.rows), 1), dtype=state.attention_mask.dtype, device=self.device)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        out = self.model(
            input_ids=tokens.view(-1, 1).to(self.device),
            attention_mask=state.attention_mask,
            position_ids=state.next_positions.view(-1, 1),
            cache=state.cache,
            use_cache=True,
        )
        state.cache = out.cache
        state.next_positions = state.next_positions + 1
        return out.logits[:, -1, :].float()

    def select(self, state: BatchState, keep: list[int]) -> BatchState:
        """Keep only the rows at `keep`, and drop cache columns no remaining row attends to."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = state.attention_mask.index_select(0, index)
        start = int(mask.any(0).nonzero()[0].item()) if mask.numel() else 0
        cache = gather(state.cache, index, start)
        positions = state.next_positions.index_select(0, index)
        return BatchState([state.rows[i] for i in keep], cache, mask[:, start:], positions)

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        """One state for both groups: the shorter history is left-padded with masked zeros."""
        width = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
        cache = assemble([a.cache, b.cache], width)
        mask = torch.cat([_lpad_mask(a.attention_mask, width), _lpad_mask(b.attention_mask, width)])
        positions = torch.cat([a.next_positions, b.next_positions])
        return BatchState(a.rows + b.rows, cache, mask, positions)


def _lpad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (missing, 0))


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> list[int | Exception]:
    """One token per row, each with its own temperature, top_p, penalties, seed and constraint.

    A row whose sampling fails (its constraint, its parameters) gets the exception in its place,
    so that it fails alone instead of taking the rest of the batch with it.
    """
    # Plain greedy rows (transcription's default) share one argmax over the batch instead of a
    # kernel and a device sync each; argmax takes the first maximum either way, so ties agree.
    greedy = logits.argmax(-1).tolist()
    tokens: list[int | Exception] = []
    for i, row in enumerate(rows):
        if _plain_greedy(row):
            tokens.append(int(greedy[i]))
            continue
        try:
            tokens.append(_sample_row(logits[i], row))
        except Exception as exc:
            tokens.append(exc)
    return tokens


def _sample_row(logits: torch.Tensor, row: Row) -> int:
    scores = _penalised(logits, row)
    mask = row.constraint.allowed() if row.constraint is not None else None
    if mask is not None:
        scores = scores.masked_fill(~mask[: scores.shape[0]].to(scores.device), float("-inf"))
    token = _pick(scores, row)
    if row.constraint is not None:
        row.constraint.advance(token)
    return token


def _plain_greedy(row: Row) -> bool:
    s = row.sampling
    penalised = bool(row.generated) and (s.presence_penalty != 0 or s.frequency_penalty != 0)
    return row.constraint is None and (s.temperature <= 0 or row.rng is None) and not penalised


def _penalised(scores: torch.Tensor, row: Row) -> torch.Tensor:
    s = row.sampling
    if not row.generated or (s.presence_penalty == 0 and s.frequency_penalty == 0):
        return scores
    ids, counts = torch.tensor(row.generated, device=scores.device).unique(return_counts=True)
    scores = scores.clone()
    scores[ids] -= s.presence_penalty + s.frequency_penalty * counts.to(scores.dtype)
    return scores


def _pick(scores: torch.Tensor, row: Row) -> int:
    s = row.sampling
    if s.temperature <= 0 or row.rng is None:
        return int(scores.argmax().item())
    probs = torch.softmax(scores / s.temperature, dim=-1).cpu()
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cut = sorted_probs.cumsum(0) - sorted_probs > s.top_p
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.rng).item())
