"""One streamed chat answer (SSE), under one id: each of its `n` choices' content deltas, tool-call deltas
and log-probs as tokens come, interleaved by `index`.

Content goes out as it decodes (never half a character, never the start of a stop string that may still
complete). From a choice's first [TOOL_CALLS] on (tools on), its tokens are read as calls: a first delta
per call with its id and name, then argument fragments (app/model/callstream.py). A chunk's log-probs are
those of the tokens it carries; tokens held back (half a character) send theirs with the next chunk.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from app.api import render
from app.api.chat_request import ChatJob
from app.api.logprobs import chat_content
from app.api.sse import sse
from app.engine.engine import Engine
from app.engine.item import WorkItem
from app.errors import VoxtralError
from app.model.callstream import CallDelta, CallReader
from app.model.detok import IncrementalDecoder
from app.model.toolcalls import split_at_calls
from app.types import GenerationResult, TokenEvent

Delta = tuple[dict[str, Any], list[dict[str, Any]] | None]
"""A chunk's delta and the log-probs of the tokens it carries."""


class ChoiceStream:
    """One choice of a streamed answer: what its tokens mean to the client so far."""

    def __init__(self, job: ChatJob, index: int) -> None:
        self.job, self.index = job, index
        self.decoder = IncrementalDecoder.from_bytes(job.vocab.bytes_of, job.prepared.sampling.stop_strings)
        self.tokens = 0
        self.reader: CallReader | None = None
        self.pending: list[dict[str, Any]] = []
        self.asks_logprobs = job.prepared.sampling.logprobs is not None

    def push(self, event: TokenEvent) -> list[Delta]:
        self.tokens += len(event.token_ids)
        if event.logprobs:
            self.pending += chat_content(self.job.vocab, event.logprobs)
        ids, after = event.token_ids, list[int]()
        if self.reader is None and self.job.tool_names is not None:
            ids, after = split_at_calls(ids, self.job.vocab)
            self.reader = CallReader(self.job.vocab) if after else None
        elif self.reader is not None:
            ids, after = [], ids
        deltas = [{"content": text} for text in [self.decoder.push(ids)] if text]
        deltas += [_call(d) for d in self.reader.push(after)] if self.reader is not None else []
        return self._with_logprobs(deltas)

    def end(self, result: GenerationResult | None) -> tuple[list[Delta], str]:
        """The last deltas and the finish reason."""
        deltas = [{"content": text} for text in [self.decoder.flush()] if text]
        finish = "stop" if self.decoder.stopped or result is None else result.finish_reason
        if self.reader is not None:
            deltas += [_call(d) for d in self.reader.finish()]
            if not self.reader.calls:  # v7 calls that did not parse: their JSON, as text
                text = self.job.vocab.text(self.reader.held)
                deltas += [{"content": text}] if text else []
            elif finish == "stop" and self.reader.valid(self.job.tool_names):
                finish = "tool_calls"
        return self._with_logprobs(deltas), finish

    def leftover(self) -> list[dict[str, Any]] | None:
        pending, self.pending = self.pending, []
        return pending if pending else None

    def _with_logprobs(self, deltas: list[dict[str, Any]]) -> list[Delta]:
        out: list[Delta] = [(delta, None) for delta in deltas]
        if out and self.asks_logprobs:
            out[0] = (out[0][0], self.leftover() or [])
        return out


def _call(delta: CallDelta) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": delta.index}
    function: dict[str, Any] = {"arguments": delta.arguments}
    if delta.id is not None:
        entry.update(id=delta.id, type="function")
        function["name"] = delta.name
    entry["function"] = function
    return {"tool_calls": [entry]}


class ChatStream:
    """The SSE events of one answer."""

    def __init__(self, job: ChatJob, model: str, fingerprint: str, include_usage: bool) -> None:
        self.job, self.model, self.fingerprint, self.include_usage = job, model, fingerprint, include_usage
        self.id, self.created = render.new_id("chatcmpl"), int(time.time())
        self.choices = [ChoiceStream(job, i) for i in range(job.prepared.sampling.choices)]

    async def run(self, engine: Engine, item: WorkItem) -> AsyncIterator[bytes]:
        for choice in self.choices:
            yield self._chunk(choice.index, {"role": "assistant", "content": ""})
        try:
            async for event in engine.stream(item):
                choice = self.choices[event.index]
                for delta, logprobs in choice.push(event):
                    yield self._chunk(choice.index, delta, logprobs=logprobs)
                if all(c.decoder.stopped for c in self.choices):
                    item.cancel()
                    break
        except VoxtralError as exc:
            yield sse(exc.error_body())
            yield sse("[DONE]")
            return
        for chunk in self._end(item.result):
            yield chunk

    def _end(self, result: GenerationResult | None) -> Iterator[bytes]:
        results = (result.choices or [result]) if result is not None else [None] * len(self.choices)
        for choice, outcome in zip(self.choices, results, strict=True):
            deltas, finish = choice.end(outcome)
            for delta, logprobs in deltas:
                yield self._chunk(choice.index, delta, logprobs=logprobs)
            yield self._chunk(choice.index, {}, finish, choice.leftover() if choice.asks_logprobs else None)
        if self.include_usage:
            chunk = render.chat_chunk(self.id, self.model, self.fingerprint, self.created, {}, None)
            completion = sum(c.tokens for c in self.choices)
            chunk["choices"], chunk["usage"] = [], render.chat_usage(self.job.prepared.prompt_tokens, completion)
            yield sse(chunk)
        yield sse("[DONE]")

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: list[dict[str, Any]] | None = None
    ) -> bytes:
        chunk = render.chat_chunk(self.id, self.model, self.fingerprint, self.created, delta, finish)
        choice = chunk["choices"][0]
        choice["index"] = index
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs, "refusal": None}
        return sse(chunk)
