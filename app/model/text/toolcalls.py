"""Token ids -> Mistral tool calls, and Mistral <-> OpenAI call ids.

Calls are parsed on token ids, never on decoded text: decoding drops the special markers, and
text that merely spells "[TOOL_CALLS]" must never become a call. The layouts, by tokenizer version:
  v11  [TOOL_CALLS]name[CALL_ID]id[ARGS]{json}   (the call id is optional)
  v13+ [TOOL_CALLS]name[ARGS]{json}
  v7-  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
Anything that does not fit is not a call: the caller returns it as text.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Collection, Sequence
from typing import Any

from app.model.values import TokenVocab
from app.types import ParsedCall

_ALNUM = string.ascii_letters + string.digits
CALL_ID_RE = re.compile(r"[a-zA-Z0-9]{9}")
"""A Mistral call id (also a valid OpenAI one)."""
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
"""A function name OpenAI accepts."""


def split_at_calls(ids: Sequence[int], vocab: TokenVocab) -> tuple[list[int], list[int]]:
    """(what comes before the first [TOOL_CALLS], the rest from that marker on)."""
    marker = vocab.tool_calls_id
    cut = next((i for i, t in enumerate(ids) if t == marker), len(ids)) if marker is not None else len(ids)
    return list(ids[:cut]), list(ids[cut:])


def parse_calls(ids: Sequence[int], vocab: TokenVocab, names: Collection[str] | None = None) -> list[ParsedCall] | None:
    """The calls in `ids` (which must start with [TOOL_CALLS]), or None if anything is malformed.

    `names`, when given, are the only functions that may be called.
    """
    if not ids or vocab.tool_calls_id is None or ids[0] != vocab.tool_calls_id:
        return None
    calls: list[ParsedCall] = []
    for segment in _segments(ids, vocab.tool_calls_id):
        found = _json_calls(segment, vocab) if vocab.syntax == "json" else _marked_call(segment, vocab)
        if found is None:
            return None
        calls.extend(found)
    if not calls or any(not NAME_RE.fullmatch(c.name) or (names is not None and c.name not in names) for c in calls):
        return None
    return calls


def _segments(ids: Sequence[int], marker: int) -> list[list[int]]:
    segments: list[list[int]] = []
    for token in ids:
        if token == marker:
            segments.append([])
        else:
            segments[-1].append(token)
    return segments


def _marked_call(segment: list[int], vocab: TokenVocab) -> list[ParsedCall] | None:
    """name [CALL_ID] id [ARGS] json  |  name [ARGS] json"""
    args_id = vocab.args_id
    if args_id is None or segment.count(args_id) != 1:
        return None
    cut = segment.index(args_id)
    head, args = segment[:cut], segment[cut + 1 :]
    call_id = ""
    if vocab.call_id_id is not None and vocab.call_id_id in head:
        split = head.index(vocab.call_id_id)
        head, call_id = head[:split], vocab.text(head[split + 1 :]).strip()
    if any(vocab.is_special(t) for t in head + args):
        return None
    arguments = vocab.text(args)
    if json_object(arguments) is None:
        return None
    return [_call(vocab.text(head).strip(), arguments, call_id)]


def _json_calls(segment: list[int], vocab: TokenVocab) -> list[ParsedCall] | None:
    """[{"name": ..., "arguments": {...}, "id"?: ...}, ...] (or one bare object)."""
    if any(vocab.is_special(t) for t in segment):
        return None
    value = _json_value(vocab.text(segment))
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        raw = item.get("arguments", {})
        arguments = json_object(raw) if isinstance(raw, str) else raw
        if not isinstance(arguments, dict):
            return None
        calls.append(_call(item["name"], json.dumps(arguments, ensure_ascii=False), str(item.get("id", ""))))
    return calls


def _call(name: str, arguments: str, call_id: str) -> ParsedCall:
    """`arguments` as the model wrote them (v11, v13), so streamed fragments join to exactly this text."""
    valid_id = call_id if CALL_ID_RE.fullmatch(call_id) else new_call_id()
    return ParsedCall(name, arguments, valid_id)


def _json_value(text: str) -> Any:
    """The one JSON value `text` holds (whitespace around it allowed), or None."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def json_object(text: str) -> dict[str, Any] | None:
    """The JSON object `text` holds, or None (call arguments must be one)."""
    value = _json_value(text)
    return value if isinstance(value, dict) else None


# -- call ids -------------------------------------------------------------------------------------
def new_call_id() -> str:
    """A Mistral call id (9 alphanumerics), which is also a valid OpenAI tool-call id."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def mistral_call_id(openai_id: str) -> str:
    """OpenAI ids ("call_abc...") do not fit Mistral's 9-alphanumeric rule: map them, deterministically,
    so an assistant's call and the tool result answering it keep matching (across requests too)."""
    if CALL_ID_RE.fullmatch(openai_id):
        return openai_id
    number = int.from_bytes(hashlib.sha256(openai_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, rest = divmod(number, len(_ALNUM))
        chars.append(_ALNUM[rest])
    return "".join(chars)
