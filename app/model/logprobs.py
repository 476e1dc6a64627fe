"""Log-probabilities of the rows that ask for them, computed on the device with the batch's draw.

What they are: the model's own distribution, `log_softmax` of the raw logits, before penalties, grammar
masks, temperature and truncation (OpenAI's and vLLM's default), so they read the same whatever the
request's sampling settings. One `log_softmax` over the asking rows, a `topk` of it for the alternatives,
and a gather of the chosen tokens; the results join the chosen ids in the sampler's single transfer to the
host (as float64, which holds every token id exactly). A row whose token changes after that transfer (a
re-draw from more candidates, a grammar's closing token) has its log-prob gathered again, only then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.model.row import Row, take_rows
from app.model.topk import topk
from app.types import TokenLogprob


@dataclass
class Logprobs:
    """The log-softmax of the asking rows, and how many alternatives the most demanding one wants."""

    rows: list[int]
    """Their positions in the batch."""
    asked: list[int]
    """How many alternatives each of them wants."""
    table: torch.Tensor
    top: int
    raw: torch.Tensor
    """Their raw logits: the alternatives are ranked on these, so the first is exactly their argmax."""
    _best: tuple[torch.Tensor, torch.Tensor] | None = None

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) of the `top` most likely tokens of each asking row, computed once a step."""
        if self._best is None:
            ids = topk(self.raw, self.top)[1]
            self._best = self.table.gather(1, ids), ids
        return self._best

    def argmax(self, greedy: list[int]) -> torch.Tensor | None:
        """The greedy rows' tokens from the top alternatives, when every one of them asked for some: one
        `topk` pass then serves both (valid only where the scores are the raw logits, the caller's check)."""
        if not self.top or not set(greedy) <= set(self.rows):
            return None
        index = torch.tensor([self.rows.index(i) for i in greedy], device=self.table.device)
        return self.best()[1].index_select(0, index)[:, 0]

    @classmethod
    def of(cls, logits: torch.Tensor, rows: Sequence[Row], live: Sequence[int]) -> Logprobs | None:
        """None when no row asks: the batch pays nothing."""
        asking = [i for i in live if rows[i].sampling.logprobs is not None]
        if not asking:
            return None
        raw = take_rows(logits, asking)
        asked = [rows[i].sampling.logprobs or 0 for i in asking]
        return cls(asking, asked, torch.log_softmax(raw.float(), dim=-1), max(asked), raw)

    def device_parts(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Chosen log-probs, then the top alternatives' log-probs and ids, flat, as float64: appended to
        the tokens' transfer."""
        chosen = self._gather(tokens.index_select(0, torch.tensor(self.rows, device=tokens.device)))
        parts = [chosen.double()]
        if self.top:
            values, ids = self.best()
            parts += [values.flatten().double(), ids.flatten().double()]
        return parts

    def read(self, host: Sequence[float], tokens: Sequence[int], drawn: Sequence[int]) -> dict[int, TokenLogprob]:
        """Per batch position: its TokenLogprob, from the transferred `host` values. `drawn` are the tokens
        as the device chose them; where `tokens` (the final ones) differ, the log-prob is gathered again."""
        n, k = len(self.rows), self.top
        chosen = list(host[:n])
        changed = [j for j, i in enumerate(self.rows) if tokens[i] != drawn[i]]
        if changed:
            again = torch.tensor([tokens[self.rows[j]] for j in changed], device=self.table.device)
            fresh = self._gather(again, torch.tensor(changed, device=self.table.device)).tolist()
            for j, value in zip(changed, fresh, strict=True):
                chosen[j] = value
        values, ids = host[n : n + n * k], host[n + n * k : n + 2 * n * k]
        out = {}
        for j, i in enumerate(self.rows):
            top = tuple((int(ids[m]), float(values[m])) for m in range(j * k, j * k + self.asked[j]))
            out[i] = TokenLogprob(tokens[i], float(chosen[j]), top)
        return out

    def _gather(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        table = self.table if rows is None else self.table.index_select(0, rows)
        return table.gather(1, tokens.view(-1, 1).to(table.device)).squeeze(1)
