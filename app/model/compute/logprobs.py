"""Log-probabilities of the rows that ask for them, computed on the device with the batch's draw.

What they are: the model's own distribution, `log_softmax` of the raw logits, before penalties, grammar
masks, temperature and truncation (OpenAI's and vLLM's default), so they read the same whatever the
request's sampling settings.

How: a token's log-prob is its raw logit minus its row's log-normaliser `log(sum(exp(logits)))`, so a step needs
one number per asking row, not a table: a `log_softmax` of 32 x 131,072 float32 logits writes 16 MB, while the
normaliser is one `exp` and a sum (docs/PERF.md#model-log-probs).
On a CPU the exponentials are taken unshifted: a float32 row overflows only if a logit is above ~76 (88, less
the log of the vocabulary) and loses precision only when every logit is below ~-58, and both show in the sum
(not finite, or tiny), so those rows alone are computed again shifted by their maximum. On a GPU it is shifted
by the row's maximum, a few kernels, the log taken in float64. The alternatives are a `topk` of the raw logits
less the normaliser; the chosen tokens' logits are gathered;
all of it joins the chosen ids in the sampler's single transfer to the host (as float64, which holds every token
id exactly), and the subtraction is done there in float64, capped at 0: an unshifted float32 `exp` is within an
ulp, so a near-certain token's logit can exceed its normaliser by ~1e-7, and a probability above 1 is never
sent. A row whose token changes after that transfer (a re-draw from more candidates, a grammar's closing token)
has its logit gathered again, only then.

Ties: `topk` does not promise an order among equal values (CUDA's does not), and bfloat16 logits tie often.
The sampler never takes a token from it (a greedy row's is its argmax, the lowest index of the maximum); on
the host the alternatives are put in one order, whatever `topk` gave: by value, the row's own token first among
equal values, then by id; where the token ties with the last alternative but `topk` left it out, it takes that
place. So a greedy row's first alternative is always its token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.model.compute.row import Row, take_rows
from app.model.compute.topk import topk
from app.model.compute.transfer import upload
from app.types import TokenLogprob

SAFE_SUM = 1e-20
"""Rows whose unshifted sum is below this are summed again shifted by their maximum. Above it the row's maximum
is at least -58 (ln 1e-20 less ln 131,072), so every logit within 29 of it has a normal float32 exponential and
the ones that flush to zero weigh less than float32's precision (131,072 x e^-29 = 3e-8 of the sum). A sum
that overflowed (inf; a logit near 76 or above) is taken again the same way."""


def log_normalizers(raw: torch.Tensor) -> torch.Tensor:
    """`log(sum(exp(row)))` of each row of `raw` (rows, vocab), in float64: what `log_softmax` subtracts."""
    scores = raw.float()
    if not scores.is_cpu:  # shifted, and the log taken in float64: a few kernels on a GPU
        peak = scores.amax(-1, keepdim=True)
        return peak.squeeze(1).double() + (scores - peak).exp().sum(-1).double().log()
    sums = scores.exp().sum(-1).double()
    out = sums.log()
    unsafe = (~torch.isfinite(sums) | (sums < SAFE_SUM)).nonzero().flatten()
    if unsafe.numel():
        out[unsafe] = torch.logsumexp(scores.index_select(0, unsafe).double(), dim=-1)
    return out


@dataclass
class Logprobs:
    """The asking rows' raw logits and log-normalisers, and how many alternatives the most demanding wants."""

    rows: list[int]
    """Their positions in the batch."""
    asked: list[int]
    """How many alternatives each of them wants."""
    raw: torch.Tensor
    """Their raw logits: the alternatives are ranked on these."""
    normalizers: torch.Tensor
    """float64, one per asking row."""
    top: int
    _best: tuple[torch.Tensor, torch.Tensor] | None = None

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw logits, ids) of the `top` most likely tokens of each asking row, computed once a step."""
        if self._best is None:
            self._best = topk(self.raw, self.top)
        return self._best

    @classmethod
    def of(cls, logits: torch.Tensor, rows: Sequence[Row], live: Sequence[int]) -> Logprobs | None:
        """None when no row asks: the batch pays nothing."""
        asking = [i for i in live if rows[i].sampling.logprobs is not None]
        if not asking:
            return None
        raw = take_rows(logits, asking)
        asked = [rows[i].sampling.logprobs or 0 for i in asking]
        return cls(asking, asked, raw, log_normalizers(raw), max(asked))

    def device_parts(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Normalisers, chosen tokens' logits, then the top alternatives' logits and ids, flat, as float64:
        appended to the tokens' transfer."""
        chosen = self._gather(tokens.index_select(0, upload(self.rows, tokens.device, torch.long)))
        parts = [self.normalizers, chosen.double()]
        if self.top:
            values, ids = self.best()
            parts += [values.flatten().double(), ids.flatten().double()]
        return parts

    def read(self, host: Sequence[float], tokens: Sequence[int], drawn: Sequence[int]) -> dict[int, TokenLogprob]:
        """Per batch position: its TokenLogprob, from the transferred `host` values. `drawn` are the tokens
        as the device chose them; where `tokens` (the final ones) differ, the logit is gathered again."""
        n, k = len(self.rows), self.top
        norms, chosen = host[:n], list(host[n : 2 * n])
        changed = [j for j, i in enumerate(self.rows) if tokens[i] != drawn[i]]
        if changed:
            again = upload([tokens[self.rows[j]] for j in changed], self.raw.device, torch.long)
            fresh = self._gather(again, upload(changed, self.raw.device, torch.long)).tolist()
            for j, value in zip(changed, fresh, strict=True):
                chosen[j] = value
        values, ids = host[2 * n : 2 * n + n * k], host[2 * n + n * k : 2 * n + 2 * n * k]
        out = {}
        for j, i in enumerate(self.rows):
            norm = norms[j]
            best = ranked(values[j * k : (j + 1) * k], ids[j * k : (j + 1) * k], tokens[i], chosen[j])
            top = tuple((token, min(value - norm, 0.0)) for value, token in best[: self.asked[j]])
            out[i] = TokenLogprob(tokens[i], min(chosen[j] - norm, 0.0), top)
        return out

    def _gather(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        raw = self.raw if rows is None else self.raw.index_select(0, rows)
        return raw.gather(1, tokens.view(-1, 1).to(raw.device)).squeeze(1).double()


def ranked(values: Sequence[float], ids: Sequence[float], token: int, logit: float) -> list[tuple[float, int]]:
    """One row's alternatives (`values`, `ids`: its `topk`, in any order among equal values) as (raw logit,
    id), in one order: by value, `token` (the row's own, raw logit `logit`) first among equal values, then
    by id. Where `token` ties with the last one but is not among them, it takes that place."""
    entries = [(value, int(i)) for value, i in zip(values, ids, strict=True)]
    if entries and all(i != token for _, i in entries) and logit >= min(value for value, _ in entries):
        entries.remove(min(entries, key=lambda e: (e[0], -e[1])))
        entries.append((logit, token))
    return sorted(entries, key=lambda e: (-e[0], e[1] != token, e[1]))
