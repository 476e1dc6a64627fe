"""One streamed chat answer as typed deltas: each of its `n` choices' content, tool-call fragments and
log-probs as tokens come, interleaved by `index`.

Content goes out as it decodes (never half a character, never the start of a stop string that may still
complete). From a choice's first [TOOL_CALLS] on (tools on), its tokens are read as calls: a first delta
per call with its id and name, then argument fragments (app/model/text/callstream.py). A delta's log-probs are
those of the tokens it carries; tokens held back (half a character) send theirs with the next delta.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

from app.engine.ticket import Ticket
from app.serving.chat_request import ChatJob
from app.serving.deltas import ChatDelta, ChoiceEnd, ChoiceStart, ContentDelta, Scores, ToolCallDelta, Usage
from app.serving.logprobs import TokenScore, chat_content
from app.types import GenerationResult, TokenEvent

Piece = ContentDelta | ToolCallDelta


class ChoiceStream:
    """One choice of a streamed answer: what its tokens mean to the client so far."""

    def __init__(self, job: ChatJob, index: int) -> None:
        self.job, self.index, self.runtime = job, index, job.runtime
        self.decoder = self.runtime.decoder(job.prepared.sampling.stop_strings)
        self.tokens = 0
        self.cached_tokens = 0
        self.reader = self.runtime.call_reader()
        self.calling = False
        """A [TOOL_CALLS] came (tools on): every token from it on goes to `reader`."""
        self.pending: list[TokenScore] = []
        self.asks_logprobs = job.prepared.sampling.logprobs is not None

    def push(self, event: TokenEvent) -> list[Piece]:
        self.tokens += len(event.token_ids)
        self.cached_tokens = event.cached_tokens
        if event.logprobs:
            self.pending += chat_content(self.runtime.vocab, event.logprobs)
        ids, after = event.token_ids, list[int]()
        if not self.calling and self.job.tool_names is not None:
            ids, after = self.runtime.split_at_calls(ids)
            self.calling = bool(after)
        elif self.calling:
            ids, after = [], ids
        deltas: list[Piece] = [ContentDelta(self.index, text) for text in [self.decoder.push(ids)] if text]
        if self.calling:
            deltas += [ToolCallDelta(self.index, d) for d in self.reader.push(after)]
        return self._with_logprobs(deltas)

    def end(self, result: GenerationResult | None) -> list[Piece | ChoiceEnd]:
        """The last deltas, then the choice's end with its finish reason."""
        deltas: list[Piece] = [ContentDelta(self.index, text) for text in [self.decoder.flush()] if text]
        finish = "stop" if self.decoder.stopped or result is None else result.finish_reason
        if self.calling:
            deltas += [ToolCallDelta(self.index, d) for d in self.reader.finish()]
            if not self.reader.calls:  # v7 calls that did not parse: their JSON, as text
                text = self.runtime.text(self.reader.held)
                deltas += [ContentDelta(self.index, text)] if text else []
            elif finish == "stop" and self.reader.valid(self.job.tool_names):
                finish = "tool_calls"
        out: list[Piece | ChoiceEnd] = [*self._with_logprobs(deltas)]
        out.append(ChoiceEnd(self.index, finish, (self._leftover() or None) if self.asks_logprobs else None))
        return out

    def _leftover(self) -> list[TokenScore]:
        pending, self.pending = self.pending, []
        return pending

    def _with_logprobs(self, deltas: list[Piece]) -> list[Piece]:
        if deltas and self.asks_logprobs:
            scores: Scores = self._leftover()
            deltas[0] = replace(deltas[0], logprobs=scores)
        return deltas


async def chat_deltas(job: ChatJob, ticket: Ticket) -> AsyncIterator[ChatDelta]:
    """Every choice's start, its deltas as tokens come, its end; then the usage. Errors propagate."""
    choices = [ChoiceStream(job, i) for i in range(job.prepared.sampling.choices)]
    for choice in choices:
        yield ChoiceStart(choice.index)
    async for event in ticket.events():
        for delta in choices[event.index].push(event):
            yield delta
        if all(c.decoder.stopped for c in choices):
            ticket.cancel()  # every choice hit a stop string: the rows stop before their next step
            break
    for last in _ends(choices, ticket.final):
        yield last
    yield Usage(job.prepared.prompt_tokens, sum(c.tokens for c in choices), choices[0].cached_tokens)


def _ends(choices: list[ChoiceStream], result: GenerationResult | None) -> Iterator[ChatDelta]:
    results = (result.choices or [result]) if result is not None else [None] * len(choices)
    for choice, outcome in zip(choices, results, strict=True):
        yield from choice.end(outcome)
