"""The next token of every row of a batch, in a few tensor ops on the logits' device.

Every row is handled in the same ops and the host receives one tensor a step: the chosen ids (with their
log-probs where a row asks, app/model/compute/logprobs.py). Row by row, sampling at the real vocabulary cost
many forward passes' worth a step (docs/PERF.md#model-sampling).

Order, as vLLM's sampler: presence/frequency penalties and grammar masks on the raw logits; greedy
rows (temperature 0) take the argmax of that, exactly; sampled rows divide by their temperature, then
keep tokens by min_p (probability >= min_p x the top one's), top_k, and top_p (the smallest set of
the most likely tokens whose mass reaches top_p, renormalised after min_p and top_k), and draw by the
inverse CDF with one uniform number from the row's own generator (`Row.rng`), so a seeded row draws
the same token alone and in any batch.

Truncation reads candidates (`topk`), not a sort: the kept set is a prefix of the probability order, so it
is exact whenever it ends inside the candidates; a row whose kept set reaches the last one is drawn again
from more (`TIERS`), the last time from the whole sorted vocabulary. Untruncated rows need no order.
Grammar masks (app/model/compute/masks.py) are filled for all constrained rows together, optionally while the
forward pass runs (`prefetch`); after the draw a constrained row's grammar may replace the token with the one
that closes it within `max_tokens` (`Constraint.settle`, app/model/text/closing.py), and the row's log-prob
is gathered for the token it really takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.model.compute.logprobs import Logprobs
from app.model.compute.masks import MaskFiller, apply, greedy_masked, host_argmax, matcher
from app.model.compute.row import Row, take_rows
from app.model.compute.topk import topk
from app.model.compute.transfer import upload
from app.types import Sampled

TIERS = (32, 1024)
"""Candidates for truncation, then for rows whose kept set reached past them, before the whole sorted
vocabulary. At temperature 0.2 a kept set is a few tokens; at 1.0 on a flat distribution, thousands
(each tier's cost: docs/PERF.md#model-sampling)."""


class Sampler:
    """Owns the grammar masks' filler (app/model/compute/masks.py), whose thread fills them during the forward pass."""

    def __init__(self, threads: int | None = None) -> None:
        self._masks = MaskFiller(threads)

    @property
    def _pending(self) -> Any:
        """The prefetch in flight, if any (tests and the benchmark wait on it)."""
        return self._masks.pending

    def prefetch(self, rows: Sequence[Row]) -> None:
        """Start filling the masks the next `sample` of these rows needs; call it before the forward pass,
        after the rows' last tokens were sampled. A failure here is left for `sample` to meet again."""
        self._masks.prefetch(rows)

    def step(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[Sampled | Exception]:
        """One token per row, with its log-probs where the row asks. A row whose constraint fails gets the
        exception in its place and fails alone."""
        errors: dict[int, Exception] = {}
        penalised = _penalised(logits, rows)
        constrained = _constrained(rows, errors)
        bits = self._masks.bits([rows[i] for i in constrained]) if constrained else None
        # On a CPU model greedy rows are checked after their argmax (app/model/compute/masks.py); the rest are masked.
        full = [j for j, i in enumerate(constrained) if rows[i].sampling.temperature > 0 or not logits.is_cpu]
        index = [constrained[j] for j in full]
        scores = apply(penalised, bits[full], index) if bits is not None and full else penalised
        live = [i for i in range(len(rows)) if i not in errors]
        probs = Logprobs.of(logits, rows, live)
        out, drawn, extra = _choose(scores, rows, live, probs)
        if bits is not None and len(full) < len(constrained):
            _fix_refused(out, scores, bits, constrained, set(full))
        for i in [i for i, row in enumerate(rows) if row.constraint is not None and i not in errors]:
            try:  # every constrained row: a tool call's grammar starts at its trigger, when it had no mask
                out[i] = _settle(rows[i], out[i])
            except Exception as exc:
                errors[i] = exc
        found = probs.read(extra, out, drawn) if probs is not None else {}
        return [errors.get(i) or Sampled(token, found.get(i)) for i, token in enumerate(out)]

    def sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int | Exception]:
        """`step`'s tokens alone."""
        return [s.token if isinstance(s, Sampled) else s for s in self.step(logits, rows)]


def _constrained(rows: Sequence[Row], errors: dict[int, Exception]) -> list[int]:
    """Positions of the rows whose grammar decides their next token; a row whose constraint fails to say
    goes to `errors`."""
    constrained: list[int] = []
    for i, row in enumerate(rows):
        try:
            if matcher(row) is not None:
                constrained.append(i)
        except Exception as exc:
            errors[i] = exc
    return constrained


def _fix_refused(
    out: list[int], scores: torch.Tensor, bits: torch.Tensor, constrained: list[int], full: set[int]
) -> None:
    """Greedy constrained rows that were not masked: their plain argmax stands where the grammar allows it,
    the others take their masked argmax (app/model/compute/masks.py)."""
    picked = [j for j in range(len(constrained)) if j not in full]
    index = [constrained[j] for j in picked]
    chosen = greedy_masked(scores, bits[picked], index, [out[i] for i in index])
    for i, token in zip(index, chosen, strict=True):
        out[i] = token


def _settle(row: Row, token: int) -> int:
    """The grammar may replace the token with one that closes it in time (app/model/text/closing.py)."""
    assert row.constraint is not None
    token = row.constraint.settle(token, row.sampling.max_new_tokens - len(row.generated))
    row.constraint.advance(token)
    return token


# -- penalties ---------------------------------------------------------------------------------------
def _penalised(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over each row's generated tokens, counted on the device."""
    picked = [i for i, r in enumerate(rows) if r.generated and _penalises(r)]
    if not picked:
        return logits
    vocab, device = logits.shape[1], logits.device
    ids = torch.full((len(picked), max(len(rows[i].generated) for i in picked)), vocab, dtype=torch.long)
    for j, i in enumerate(picked):
        ids[j, : len(rows[i].generated)] = torch.tensor(rows[i].generated)
    ids = upload(ids, device)
    counts = torch.zeros((len(picked), vocab + 1), device=device).scatter_add_(
        1, ids, torch.ones(ids.shape, device=device)
    )
    counts = counts[:, :vocab]
    presence, frequency = _columns(
        [[rows[i].sampling.presence_penalty for i in picked], [rows[i].sampling.frequency_penalty for i in picked]],
        device,
    )
    index = upload(picked, device, torch.long)
    penalised = logits.index_select(0, index) - presence * (counts > 0) - frequency * counts
    return logits.index_put((index,), penalised)


def _penalises(row: Row) -> bool:
    return row.sampling.presence_penalty != 0 or row.sampling.frequency_penalty != 0


def _columns(values: Sequence[Sequence[float]], device: torch.device) -> list[torch.Tensor]:
    """Float32 columns (rows, 1) on `device` of each list of `values`, in one upload: float64 on the host,
    which holds each Python float exactly, so each column is what `torch.tensor(column, float32)` makes."""
    table = upload(torch.tensor(values, dtype=torch.float64), device)
    return [column.float().unsqueeze(1) for column in table]


# -- choosing ----------------------------------------------------------------------------------------
def _choose(
    scores: torch.Tensor, rows: Sequence[Row], live: list[int], probs: Logprobs | None
) -> tuple[list[int], list[int], list[float]]:
    """Greedy rows' argmax and sampled rows' draws, to the host in one transfer with the asked log-probs.
    Rows that `draw` flags are drawn again with more candidates (another transfer, only then).
    Returns the tokens, the tokens as first drawn, and the log-prob values of that transfer."""
    tokens, flags, cut, cut_params = _first_draw(scores, rows, live)
    if probs is None:
        host: list[float] = torch.cat([tokens, flags]).tolist()
    else:  # float64 holds every token id exactly: still one tensor, one transfer
        host = torch.cat([tokens.double(), flags.double(), *probs.device_parts(tokens)]).tolist()
    out = [int(t) for t in host[: len(rows)]]
    drawn = list(out)
    again = [j for j, flag in enumerate(host[len(rows) : len(rows) + len(flags)]) if flag]
    for candidates in (*TIERS[1:], scores.shape[1]):
        if not again or cut_params is None:
            break
        params = cut_params.select(upload(again, scores.device, torch.long))
        tokens_again, flagged = draw(take_rows(scores, [cut[j] for j in again]), params, candidates)
        read = torch.cat([tokens_again, flagged.long()]).tolist()  # one transfer a tier
        for j, token in zip(again, read[: len(again)], strict=True):
            out[cut[j]] = int(token)
        again = [j for j, flag in zip(again, read[len(again) :], strict=True) if flag]
    return out, drawn, host[len(rows) + len(flags) :]


def _first_draw(
    scores: torch.Tensor, rows: Sequence[Row], live: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[int], _Params | None]:
    """On the device: every row's token, and which truncating rows (`cut`) must be drawn again. A greedy
    row's token is its argmax, the lowest index of its maximum, whether or not it asks for alternatives:
    never the first of a `topk`, which does not promise the lowest index among equal values (CUDA's does
    not), so asking for log-probs never changes a greedy answer."""
    tokens = torch.zeros(len(rows), dtype=torch.long, device=scores.device)
    greedy = [i for i in live if rows[i].sampling.temperature <= 0]
    if greedy:
        best = host_argmax(scores, greedy)
        tokens = _put(tokens, greedy, best if best is not None else take_rows(scores, greedy).argmax(-1))
    sampled = [i for i in live if rows[i].sampling.temperature > 0]
    cut = [i for i in sampled if _truncates(rows[i])]
    flags, cut_params = torch.zeros(0, dtype=torch.long, device=scores.device), None
    for group in ([i for i in sampled if not _truncates(rows[i])], cut):
        if group:
            params = _Params.of([rows[i] for i in group], scores.device)
            drawn, flagged = draw(take_rows(scores, group), params, TIERS[0])
            tokens = _put(tokens, group, drawn)
            if group is cut:
                flags, cut_params = flagged.long(), params
    return tokens, flags, cut, cut_params


def _put(tokens: torch.Tensor, index: list[int], values: torch.Tensor) -> torch.Tensor:
    if index == list(range(tokens.shape[0])):
        return values
    return tokens.index_copy(0, upload(index, tokens.device, torch.long), values)


def _truncates(row: Row) -> bool:
    s = row.sampling
    return s.top_p < 1.0 or s.top_k > 0 or s.min_p > 0


@dataclass
class _Params:
    """Sampling parameters of some rows as device columns, and the uniform number each row draws with."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    uniform: torch.Tensor
    truncates: bool
    most_k: int

    @classmethod
    def of(cls, rows: Sequence[Row], device: torch.device) -> _Params:
        s = [r.sampling for r in rows]
        columns = [[x.temperature for x in s], [x.top_p for x in s], [float(max(0, x.top_k)) for x in s]]
        columns += [[x.min_p for x in s], [_uniform(r) for r in rows]]
        table = upload(torch.tensor(columns, dtype=torch.float64), device)  # one upload a step
        t, p, k, m, u = (column.unsqueeze(1) for column in table)
        return cls(
            t.float(),
            p.float(),
            k.long(),
            m.float(),
            u,
            any(_truncates(r) for r in rows),
            max(max(0, x.top_k) for x in s),
        )

    def select(self, index: torch.Tensor) -> _Params:
        """The same rows' parameters and uniform numbers, for `index` only."""
        columns = (self.temperature, self.top_p, self.top_k, self.min_p, self.uniform)
        t, p, k, m, u = (c.index_select(0, index) for c in columns)
        return _Params(t, p, k, m, u, self.truncates, self.most_k)


def _uniform(row: Row) -> float:
    assert row.rng is not None, "a sampled row has its generator"
    return row.rng.random()


def draw(scores: torch.Tensor, params: _Params, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `scores` (rows, vocab); and whether a row's kept set may reach past the
    `candidates` most likely tokens (then it must be drawn again with more)."""
    vocab = scores.shape[1]
    if not params.truncates:
        probs = torch.softmax(scores / params.temperature, dim=-1)  # masked tokens get exactly 0
        return _invert(_cdf(probs), params.uniform), torch.zeros_like(params.uniform.squeeze(1), dtype=torch.bool)
    k = min(vocab, max(candidates, params.most_k))
    values, ids = topk(scores, k)  # temperature keeps the order
    best = values[:, :1]
    probs = ((values - best) / params.temperature).exp() / _weight(scores, best, params.temperature)
    keep = probs >= params.min_p * probs[:, :1]
    by_min_p = keep[:, -1:]
    keep &= (params.top_k == 0) | (torch.arange(k, device=values.device).unsqueeze(0) < params.top_k)
    # top_p over what min_p and top_k kept, renormalised, as vLLM does; without them the mass is the
    # whole distribution's: 1.
    cut = (params.min_p > 0) | (params.top_k > 0)
    mass = torch.where(cut, (probs * keep).sum(-1, keepdim=True), torch.ones_like(best))
    kept = probs * keep / mass
    keep &= (kept.cumsum(-1) - kept) < params.top_p
    reaches_end = torch.where(params.min_p > 0, by_min_p, keep[:, -1:]) & (params.top_k == 0)
    flagged = reaches_end.squeeze(1) & (k < vocab)
    picked = _invert(_cdf(probs * keep), params.uniform)
    return ids.gather(1, picked.unsqueeze(1)).squeeze(1), flagged


def _weight(scores: torch.Tensor, best: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """sum(exp((scores - best) / t)) per row: the softmax's denominator relative to the best token.

    Five passes, four in place. Not `torch.softmax`: at temperature 0.2 most values fall below -87,
    where exp underflows through a slow path (docs/PERF.md#model-sampling). Clamping first keeps exp on its
    fast path; the tokens it lifts
    to exp(-80) = 1.8e-35 hold at most 131,072 x 1.8e-35 of the mass together."""
    shifted = (scores / temperature).sub_(best / temperature)
    return shifted.clamp_(min=-80.0).exp_().sum(-1, keepdim=True)


def _cdf(weights: torch.Tensor) -> torch.Tensor:
    """The running sum of each row's weights, in float64. A token of weight 0 (refused by its grammar, or
    underflowed) must add nothing to it, or a draw can land on it: CUDA scans a one-row tensor as a tree
    (CUB), where rounding can leave such a token a step of one ulp of the running sum; an ulp of float64 is
    2^29 times smaller than float32's, and so is the chance of landing on one."""
    return weights.cumsum(-1, dtype=torch.float64)


def _invert(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first position whose cumulative weight exceeds u x the total: a draw in proportion to weight."""
    target = uniform * cdf[:, -1:]  # both float64
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


_DEFAULT = Sampler()


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> list[int | Exception]:
    """`Sampler.sample` without a prefetch: for callers that own no sampler (tests, warm-up)."""
    return _DEFAULT.sample(logits, rows)
