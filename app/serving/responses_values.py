"""What a Responses answer is made of, as typed values: the response (whole, stored, retrieved) and the
deltas of a streamed one. `app/api` renders each as OpenAI's JSON (`app/api/responses_render.py`,
`responses_events.py`); nothing here knows the wire shape.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from app.serving.responses_schemas import CreateResponseRequest

ItemStatus = Literal["in_progress", "completed", "incomplete"]
Status = Literal["in_progress", "completed", "incomplete", "failed"]


def item_status(finish_reason: str) -> ItemStatus:
    """An output item's status once its answer ends: incomplete where it hit max_output_tokens."""
    return "incomplete" if finish_reason == "length" else "completed"


def new_id(prefix: str) -> str:
    """OpenAI's id shapes: resp_..., msg_..., fc_..."""
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class MessageOut:
    """An assistant message of the output: its text, as one `output_text` part."""

    id: str
    text: str
    status: ItemStatus = "completed"


@dataclass(frozen=True)
class CallOut:
    """A function call of the output; `call_id` is what a `function_call_output` answers."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"


OutputItem = MessageOut | CallOut


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    """Of `input_tokens`, those taken from the prefix cache (0 in responses stored before it was counted)."""


@dataclass(frozen=True)
class ResponseObject:
    """One response: the request it answers (its input aside), its status, output and usage.

    `incomplete` means the output hit max_output_tokens; `failed` carries `error`."""

    request: CreateResponseRequest
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: Status = "in_progress"
    output: tuple[OutputItem, ...] = ()
    usage: TokenUsage | None = None
    completed_at: int | None = None
    error: str | None = None


# -- a streamed response ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """The response exists (in progress, no output yet)."""

    response: ResponseObject


@dataclass(frozen=True)
class ItemAdded:
    index: int
    item: OutputItem
    """In progress: an empty message, or a call with its name and no arguments yet."""


@dataclass(frozen=True)
class TextDelta:
    index: int
    item_id: str
    text: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    item_id: str
    text: str


@dataclass(frozen=True)
class ItemDone:
    index: int
    item: OutputItem
    """Whole: all its text, or all its arguments."""


@dataclass(frozen=True)
class Finished:
    """The response is over (completed or incomplete), with its whole output and usage; stored if asked."""

    response: ResponseObject


ResponseDelta = Started | ItemAdded | TextDelta | ArgumentsDelta | ItemDone | Finished
