"""What a streamed chat answer is made of, as typed values: `app/api` renders each as one SSE chunk."""

from __future__ import annotations

from dataclasses import dataclass

from app.serving.logprobs import TokenScore
from app.types import CallDelta

Scores = list[TokenScore] | None
"""The log-probs of the tokens a delta carries; None when the request did not ask for them."""


@dataclass(frozen=True)
class ChoiceStart:
    """A choice begins (the assistant role)."""

    index: int


@dataclass(frozen=True)
class ContentDelta:
    index: int
    text: str
    logprobs: Scores = None


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a tool call: the first of a call has its id and name."""

    index: int
    call: CallDelta
    logprobs: Scores = None


@dataclass(frozen=True)
class ChoiceEnd:
    index: int
    finish_reason: str
    logprobs: Scores = None
    """Log-probs of tokens held back until now (half a character, a stop string that did not complete)."""


@dataclass(frozen=True)
class Usage:
    """Sent last: the answer's token counts (the prompt once, every choice's tokens)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Of `prompt_tokens`, those taken from the prefix cache."""


ChatDelta = ChoiceStart | ContentDelta | ToolCallDelta | ChoiceEnd | Usage
