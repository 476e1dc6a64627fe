"""`n` choices of one request: rows that share one prefill, and one answer once they have all finished.

The prompt is prefilled once, as one row; its KV rows are then copied (`BatchGenerator.select` with the
row repeated), never recomputed, and each copy decodes as its own row with seed + its index. The
request's item is answered when its last choice finishes, with every choice's result in index order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from app.engine.item import WorkItem
from app.engine.runner import ModelRunner
from app.model.compute.generate import BatchState, Row
from app.model.compute.transfer import upload
from app.types import GenerationResult


def fan_out(
    generator: ModelRunner, state: BatchState, logits: torch.Tensor, items: Mapping[int, WorkItem]
) -> tuple[BatchState, torch.Tensor]:
    """Freshly prefilled rows with `n` > 1 become `n` rows: the same cache and logits, copied. `items`:
    the work items of the rows, by their key."""
    if all(r.sampling.choices == 1 for r in state.rows):
        return state, logits
    keep = [i for i, row in enumerate(state.rows) for _ in range(row.sampling.choices)]
    copied = generator.select(state, keep)
    copied.rows = [_choice(state.rows[i], keep[:k].count(i), items) for k, i in enumerate(keep)]
    return copied, logits.index_select(0, upload(keep, logits.device, torch.long))


def row_of(item: WorkItem, index: int = 0) -> Row:
    """The row of choice `index` of `item`'s request (the first by default): its own generator and grammar state."""
    request = item.request
    constraint = request.constraint_factory() if request.constraint_factory else None
    return Row(
        request.input_ids,
        request.audios,
        request.sampling,
        key=item.key,
        constraint=constraint,
        index=index,
        cache_salt=request.cache_salt,
    )


def _choice(row: Row, index: int, items: Mapping[int, WorkItem]) -> Row:
    return row if index == 0 else row_of(items[row.key], index)


def gather(item: WorkItem, index: int, result: GenerationResult) -> GenerationResult | None:
    """Record one choice's result; the request's whole result once every choice has one."""
    wanted = item.request.sampling.choices
    if wanted == 1:
        return result
    item.choices[index] = result
    if len(item.choices) < wanted:
        return None
    ordered = [item.choices[i] for i in range(wanted)]
    first = ordered[0]
    return GenerationResult(
        token_ids=first.token_ids,
        finish_reason=first.finish_reason,
        prompt_tokens=first.prompt_tokens,
        cached_tokens=first.cached_tokens,
        queue_time_s=first.queue_time_s,
        run_time_s=max(r.run_time_s for r in ordered),
        time_to_first_token_s=first.time_to_first_token_s,
        logprobs=first.logprobs,
        choices=ordered,
    )
