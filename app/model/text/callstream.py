"""Tool calls read as their tokens arrive: OpenAI's streamed `delta.tool_calls` entries.

Each call opens with one delta (its index, id and name, arguments "") as soon as its name is complete
(at [ARGS]), then its arguments as fragments of the generated text, decoded incrementally (never splitting
a UTF-8 character). The unstreamed answer reads the same tokens with the same reader, so the fragments
joined are exactly its arguments. A call cut short (max_tokens, a stop string) keeps what was generated:
no control token ever reaches the client as text.

v7's JSON-array syntax ([TOOL_CALLS][{"name": ..., "arguments": {...}}]) names a call inside JSON that is
only known to be one when it parses: its calls are read whole when the turn ends, each sent as one delta.
"""

from __future__ import annotations

import codecs
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from app.model.text.detok import trim_at_stop
from app.model.text.toolcalls import (
    CALL_ID_RE,
    NAME_RE,
    json_object,
    new_call_id,
    parse_calls,
    split_at_calls,
)
from app.model.values import TokenVocab
from app.types import CallDelta, ParsedCall


@dataclass
class _Draft:
    head: list[int] = field(default_factory=list)
    call_id: list[int] | None = None
    opened: bool = False
    arguments: str = ""


class CallReader:
    """Token ids from the first [TOOL_CALLS] on -> call deltas, for one answer."""

    def __init__(self, vocab: TokenVocab) -> None:
        self.vocab = vocab
        self.drafts: list[_Draft] = []
        self.calls: list[ParsedCall] = []
        """Every call opened so far, arguments as generated to this point."""
        self.held: list[int] = []
        """v7: the tokens, read when the turn ends."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> list[CallDelta]:
        if self.vocab.syntax == "json":
            self.held.extend(ids)
            return []
        out: list[CallDelta] = []
        for token in ids:
            out += self._token(token)
        return out

    def finish(self) -> list[CallDelta]:
        """The end of the turn: a call cut before its arguments opens now; v7's calls are read."""
        if self.vocab.syntax == "json":
            return self._json_calls()
        out = self._flush()
        if self.drafts and not self.drafts[-1].opened:
            out.append(self._open())
        return out

    def valid(self, names: Collection[str] | None) -> bool:
        """Every call is complete and well formed: arguments a JSON object, a function that is offered."""
        return bool(self.calls) and all(
            NAME_RE.fullmatch(c.name) and (names is None or c.name in names) and json_object(c.arguments) is not None
            for c in self.calls
        )

    def _token(self, token: int) -> list[CallDelta]:
        v = self.vocab
        if token == v.tool_calls_id:
            out = self._flush()
            if self.drafts and not self.drafts[-1].opened:
                out.append(self._open())
            self.drafts.append(_Draft())
            return out
        if not self.drafts:
            return []
        draft = self.drafts[-1]
        if draft.opened:
            return [] if v.is_special(token) else self._arguments(v.bytes_of([token]))
        if token == v.args_id:
            return [self._open()]
        if token == v.call_id_id and draft.call_id is None:
            draft.call_id = []
        elif not v.is_special(token):
            (draft.call_id if draft.call_id is not None else draft.head).append(token)
        return []

    def _open(self) -> CallDelta:
        draft = self.drafts[-1]
        draft.opened = True
        written = self.vocab.text(draft.call_id).strip() if draft.call_id is not None else ""
        call_id = written if CALL_ID_RE.fullmatch(written) else new_call_id()
        call = ParsedCall(self.vocab.text(draft.head).strip(), "", call_id)
        self.calls.append(call)
        return CallDelta(len(self.calls) - 1, "", call.id, call.name)

    def _arguments(self, data: bytes, final: bool = False) -> list[CallDelta]:
        text = str(self._utf8.decode(data, final=final))
        if not text or not self.calls:
            return []
        last = self.calls[-1]
        self.calls[-1] = ParsedCall(last.name, last.arguments + text, last.id)
        return [CallDelta(len(self.calls) - 1, text)]

    def _flush(self) -> list[CallDelta]:
        out = self._arguments(b"", final=True)
        self._utf8.reset()
        return out

    def _json_calls(self) -> list[CallDelta]:
        self.calls = parse_calls(self.held, self.vocab) or []
        return [CallDelta(i, c.arguments, c.id, c.name) for i, c in enumerate(self.calls)]


def read_calls(ids: Sequence[int], vocab: TokenVocab) -> CallReader:
    """All of `ids` read at once: the unstreamed answer's calls, as the stream would have sent them."""
    reader = CallReader(vocab)
    reader.push(ids)
    reader.finish()
    return reader


@dataclass(frozen=True)
class ChatOutput:
    """What one generation means to the client: text, tool calls, or both."""

    content: str | None
    calls: tuple[ParsedCall, ...]
    finish_reason: str


def chat_output(
    ids: Sequence[int], finish_reason: str, vocab: TokenVocab, names: Collection[str] | None, stops: Sequence[str]
) -> ChatOutput:
    """With tools on (`names`), everything from the first [TOOL_CALLS] is calls, as the stream sends them:
    `tool_calls` when the model ended the turn with well-formed calls; cut short (max_tokens, a stop string)
    or malformed, the calls as generated, with that finish reason. Control tokens are never text."""
    before, after = split_at_calls(ids, vocab) if names is not None else (list(ids), [])
    text, stopped = trim_at_stop(vocab.text(before), stops)
    reader = read_calls(after, vocab) if after and not stopped else None
    if reader is None or not reader.calls:
        rest = vocab.text(after) if after and not stopped else ""  # v7 calls that do not parse: their JSON
        text, stopped = trim_at_stop(text + rest, stops) if rest else (text, stopped)
        return ChatOutput(text, (), "stop" if stopped else finish_reason)
    hit = any(s and s in vocab.text(after) for s in stops)
    complete = finish_reason == "stop" and not hit and reader.valid(names)
    reason = "tool_calls" if complete else "stop" if hit else finish_reason
    return ChatOutput(text if text.strip() else None, tuple(reader.calls), reason)
