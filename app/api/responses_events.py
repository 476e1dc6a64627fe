"""A streamed response's typed deltas -> OpenAI's Responses server-sent events, numbered by `sequence_number`.

The order is OpenAI's: `response.created`, `response.in_progress`; per output item `response.output_item.added`
(and for a message `response.content_part.added`), its `response.output_text.delta`s or
`response.function_call_arguments.delta`s, their `.done`, (`response.content_part.done`),
`response.output_item.done`; then `response.completed` (or `response.incomplete`) with the whole response
and its usage. A failure after the stream began is an `error` event, then `response.failed`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from app.api import responses_render as render
from app.api.jsonbody import dumps
from app.errors import InternalError, VoxtralError
from app.serving.responses_values import (
    ArgumentsDelta,
    CallOut,
    ItemAdded,
    ItemDone,
    ResponseDelta,
    ResponseObject,
    Started,
    TextDelta,
)

log = logging.getLogger(__name__)


class ResponseEvents:
    def __init__(self) -> None:
        self.sequence = 0
        self.response: ResponseObject | None = None
        """The response as started: what `response.failed` reports if the stream fails."""

    async def render(self, deltas: AsyncIterator[ResponseDelta]) -> AsyncIterator[bytes]:
        try:
            async for delta in deltas:
                for event in self.events(delta):
                    yield self._sse(event)
        except Exception as exc:
            if not isinstance(exc, VoxtralError):
                log.exception("responses stream failed")
            for event in self.failure(exc):
                yield self._sse(event)

    def events(self, delta: ResponseDelta) -> list[dict[str, Any]]:
        if isinstance(delta, Started):
            self.response = delta.response
            body = render.response(delta.response)
            return [{"type": "response.created", "response": body}, {"type": "response.in_progress", "response": body}]
        if isinstance(delta, ItemAdded):
            return _added(delta)
        if isinstance(delta, TextDelta):
            return [_text_event("response.output_text.delta", delta.index, delta.item_id, delta=delta.text)]
        if isinstance(delta, ArgumentsDelta):
            common = {"item_id": delta.item_id, "output_index": delta.index, "delta": delta.text}
            return [{"type": "response.function_call_arguments.delta", **common}]
        if isinstance(delta, ItemDone):
            return _done(delta)
        kind = "response.completed" if delta.response.status == "completed" else "response.incomplete"
        return [{"type": kind, "response": render.response(delta.response)}]

    def failure(self, exc: Exception) -> list[dict[str, Any]]:
        """OpenAI's `error` event, then `response.failed` (when the response had started)."""
        known = exc if isinstance(exc, VoxtralError) else InternalError("The server had an internal error.")
        events: list[dict[str, Any]] = [
            {"type": "error", "code": known.code, "message": known.message, "param": known.param}
        ]
        if self.response is not None:
            failed = replace(self.response, status="failed", error=known.message)
            events.append({"type": "response.failed", "response": render.response(failed)})
        return events

    def _sse(self, event: dict[str, Any]) -> bytes:
        event["sequence_number"] = self.sequence
        self.sequence += 1
        kind: str = event["type"]
        return b"event: " + kind.encode() + b"\ndata: " + dumps(event) + b"\n\n"


def _added(delta: ItemAdded) -> list[dict[str, Any]]:
    events = [{"type": "response.output_item.added", "output_index": delta.index, "item": render.item(delta.item)}]
    if not isinstance(delta.item, CallOut):
        events.append(_part_event("response.content_part.added", delta.index, delta.item.id, ""))
    return events


def _done(delta: ItemDone) -> list[dict[str, Any]]:
    item, index = delta.item, delta.index
    if isinstance(item, CallOut):
        common = {"item_id": item.id, "output_index": index, "name": item.name, "arguments": item.arguments}
        first = [{"type": "response.function_call_arguments.done", **common}]
    else:
        first = [
            _text_event("response.output_text.done", index, item.id, text=item.text),
            _part_event("response.content_part.done", index, item.id, item.text),
        ]
    return [*first, {"type": "response.output_item.done", "output_index": index, "item": render.item(item)}]


def _text_event(kind: str, index: int, item_id: str, **text: str) -> dict[str, Any]:
    return {"type": kind, "item_id": item_id, "output_index": index, "content_index": 0, **text, "logprobs": []}


def _part_event(kind: str, index: int, item_id: str, text: str) -> dict[str, Any]:
    part = render.text_part(text)
    return {"type": kind, "item_id": item_id, "output_index": index, "content_index": 0, "part": part}
