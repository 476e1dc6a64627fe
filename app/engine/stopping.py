"""When a row stops and what it answers: the stop rules applied to each sampled token, and the result.

A row stops on an end-of-sequence or stop token (left out of the answer), at its token limit, or when its
text comes to contain a stop string; and whenever its client went away or its deadline passed. Plain
inputs (a row, its work item, a token): the worker calls `TokenStep.apply` for every token it samples;
tests and bench/emit_overhead.py call these with rows and items they build.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from app.engine.item import WorkItem
from app.errors import InternalError, RequestTimeout
from app.metrics import Metrics
from app.model.compute.row import Row
from app.types import FinishReason, GenerationResult, Sampled, TokenEvent

log = logging.getLogger(__name__)

MODEL_FAILED = "The model failed while running this request."
"""The message of every failure the model caused: its details go to the log, not to the client."""
Outcome = GenerationResult | BaseException


class StopRules:
    def __init__(self, eos_token_ids: set[int], decode: Callable[[list[int]], str]) -> None:
        self.eos = eos_token_ids
        self.decode = decode

    def is_stop_token(self, row: Row, token: int) -> bool:
        """End of sequence or one of the request's stop tokens: it ends the row and is not part of the answer."""
        return token in self.eos or token in row.sampling.stop_token_ids

    def reason(self, row: Row, token: int) -> FinishReason | None:
        """Why `row` ends with `token`, about to be appended; None if it goes on."""
        s = row.sampling
        if self.is_stop_token(row, token):
            return "stop"
        if len(row.generated) + 1 >= s.max_new_tokens:
            return "length"
        if s.stop_strings:
            # A stop that ends at this token lies within its last few tokens (a token yields at least
            # a quarter of a character): decode those only, not the whole answer at every step.
            window = 4 * max(len(stop) for stop in s.stop_strings) + 8
            text = self.decode([*row.generated[-window:], token])
            if any(stop in text for stop in s.stop_strings):
                return "stop"
        return None

    def record(self, row: Row, sampled: Sampled) -> bool:
        """Append `sampled` to the row's answer unless it is a stop token; True if appended."""
        if self.is_stop_token(row, sampled.token):
            return False
        row.generated.append(sampled.token)
        if sampled.logprob is not None:
            row.logprobs.append(sampled.logprob)
        return True


class TokenStep:
    """The worker's bookkeeping of one sampled token of one row: the first token's time, the stop rules,
    the streamed event, and the row's outcome once it is done."""

    def __init__(self, rules: StopRules, metrics: Metrics) -> None:
        self.rules, self.metrics = rules, metrics

    def apply(self, row: Row, item: WorkItem, sampled: Sampled | Exception, now: float) -> Outcome | None:
        """Record one token of `row` (answering `item`). Returns the row's outcome if it is done, for the
        caller to deliver; None while it goes on."""
        if isinstance(sampled, Exception):
            log.error("sampling failed for one row", exc_info=sampled)
            return InternalError(MODEL_FAILED)
        if abandoned(item, now) or item.done:  # done: another of its choices failed
            return gone()
        if item.first_token_at is None:
            item.first_token_at = now
            self.metrics.ttft.observe(now - item.enqueued_at)
        reason = self.rules.reason(row, sampled.token)
        if self.rules.record(row, sampled):
            logprobs = [sampled.logprob] if sampled.logprob else None
            item.push(TokenEvent([sampled.token], logprobs, row.index, row.cached_tokens))
        return result(row, item, reason, now) if reason is not None else None


def result(row: Row, item: WorkItem, reason: FinishReason, now: float) -> GenerationResult:
    """The finished row's answer, timed from its work item (queued, started, first token) to `now`."""
    started = item.started_at or now
    first = item.first_token_at or now
    return GenerationResult(
        token_ids=list(row.generated),
        finish_reason=reason,
        prompt_tokens=len(row.input_ids),
        cached_tokens=row.cached_tokens,
        queue_time_s=started - item.enqueued_at,
        run_time_s=now - started,
        time_to_first_token_s=first - item.enqueued_at,
        logprobs=list(row.logprobs) if row.sampling.logprobs is not None else None,
    )


def abandoned(item: WorkItem, now: float) -> bool:
    """Its client went away or its deadline passed: its rows stop before the next step."""
    return item.cancelled or item.expired(now)


def gone() -> RequestTimeout:
    """The answer of an abandoned request (nobody may read it)."""
    return RequestTimeout("The request timed out or was cancelled while running.")


def still_wanted(rows: list[Row], items: Mapping[int, WorkItem]) -> list[Row]:
    """Rows whose client still waits; the others are answered and dropped. `items`: the rows' work items
    by key."""
    now = time.monotonic()
    wanted = []
    for row in rows:
        item = items[row.key]
        if abandoned(item, now):
            item.finish(gone())
        else:
            wanted.append(row)
    return wanted
