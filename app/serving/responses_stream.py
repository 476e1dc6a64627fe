"""A streamed chat answer's deltas read as Responses' output items: a message item opens at the first text,
a function-call item at each call's first fragment; each closes when the next opens or the answer ends.

One choice only (Responses has no `n`). The items this builds are the same ones a whole answer has
(`responses.py:output_items`): text first, then the calls, each with its own id.
"""

from __future__ import annotations

from dataclasses import replace

from app.serving.deltas import ChatDelta, ChoiceEnd, ContentDelta, ToolCallDelta
from app.serving.responses_values import (
    ArgumentsDelta,
    CallOut,
    ItemAdded,
    ItemDone,
    MessageOut,
    OutputItem,
    ResponseDelta,
    TextDelta,
    item_status,
    new_id,
)


class OutputStream:
    """The output items of one streamed answer so far: `push` each chat delta, read `items` at the end."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        """Closed items, in output order."""
        self.open: OutputItem | None = None
        self.finish_reason = "stop"

    def push(self, delta: ChatDelta) -> list[ResponseDelta]:
        if isinstance(delta, ContentDelta):
            return self._text(delta.text)
        if isinstance(delta, ToolCallDelta):
            call = delta.call
            if call.id is not None:
                return self._call(call.id, call.name or "", call.arguments)
            return self._arguments(call.arguments)
        if isinstance(delta, ChoiceEnd):
            self.finish_reason = delta.finish_reason
            out = [] if self.items or self.open else self._open(MessageOut(new_id("msg"), "", "in_progress"))
            return out + self._close()
        return []  # the choice's start, the usage: the caller's

    def _text(self, text: str) -> list[ResponseDelta]:
        out: list[ResponseDelta] = []
        if not isinstance(self.open, MessageOut):
            out = self._close() + self._open(MessageOut(new_id("msg"), "", "in_progress"))
        assert isinstance(self.open, MessageOut)
        self.open = replace(self.open, text=self.open.text + text)
        return [*out, TextDelta(len(self.items), self.open.id, text)]

    def _call(self, call_id: str, name: str, arguments: str) -> list[ResponseDelta]:
        out = self._close() + self._open(CallOut(new_id("fc"), call_id, name, "", "in_progress"))
        return out + self._arguments(arguments)

    def _arguments(self, text: str) -> list[ResponseDelta]:
        if not text or not isinstance(self.open, CallOut):
            return []
        self.open = replace(self.open, arguments=self.open.arguments + text)
        return [ArgumentsDelta(len(self.items), self.open.id, text)]

    def _open(self, item: OutputItem) -> list[ResponseDelta]:
        self.open = item
        return [ItemAdded(len(self.items), item)]

    def _close(self) -> list[ResponseDelta]:
        if self.open is None:
            return []
        item, self.open = replace(self.open, status=item_status(self.finish_reason)), None
        self.items.append(item)
        return [ItemDone(len(self.items) - 1, item)]
