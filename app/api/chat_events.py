"""A streamed chat answer's typed deltas -> `chat.completion.chunk` server-sent events, under one id.

A failure after the response started (a timeout, an unexpected exception) becomes OpenAI's error
event, which the SDK raises as an APIError; the stream still ends with `data: [DONE]`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from app.api import render
from app.api.sse import sse
from app.errors import InternalError, VoxtralError
from app.serving.deltas import ChatDelta, ChoiceEnd, ChoiceStart, ContentDelta, Scores, ToolCallDelta, Usage

log = logging.getLogger(__name__)


class ChatEvents:
    def __init__(self, model: str, fingerprint: str, include_usage: bool) -> None:
        self.model, self.fingerprint, self.include_usage = model, fingerprint, include_usage
        self.id, self.created = render.new_id("chatcmpl"), int(time.time())

    async def render(self, deltas: AsyncIterator[ChatDelta]) -> AsyncIterator[bytes]:
        try:
            async for delta in deltas:
                chunk = self.chunk(delta)
                if chunk is not None:
                    yield sse(chunk)
        except VoxtralError as exc:
            yield sse(exc.error_body())
        except Exception:
            log.exception("chat stream failed")
            yield sse(InternalError("The server had an internal error while answering.").error_body())
        yield sse("[DONE]")

    def chunk(self, delta: ChatDelta) -> dict[str, Any] | None:
        if isinstance(delta, ChoiceStart):
            return self._choice(delta.index, {"role": "assistant", "content": ""})
        if isinstance(delta, ContentDelta):
            return self._choice(delta.index, {"content": delta.text}, logprobs=delta.logprobs)
        if isinstance(delta, ToolCallDelta):
            return self._choice(delta.index, {"tool_calls": [_call(delta)]}, logprobs=delta.logprobs)
        if isinstance(delta, ChoiceEnd):
            return self._choice(delta.index, {}, delta.finish_reason, delta.logprobs)
        return self._usage(delta) if self.include_usage else None

    def _usage(self, usage: Usage) -> dict[str, Any]:
        chunk = render.chat_chunk(self.id, self.model, self.fingerprint, self.created, {}, None)
        chunk["choices"] = []
        chunk["usage"] = render.chat_usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        return chunk

    def _choice(
        self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Scores = None
    ) -> dict[str, Any]:
        chunk = render.chat_chunk(self.id, self.model, self.fingerprint, self.created, delta, finish)
        choice = chunk["choices"][0]
        choice["index"] = index
        if logprobs is not None:
            choice["logprobs"] = render.chat_logprobs(logprobs)
        return chunk


def _call(delta: ToolCallDelta) -> dict[str, Any]:
    call = delta.call
    entry: dict[str, Any] = {"index": call.index}
    function: dict[str, Any] = {"arguments": call.arguments}
    if call.id is not None:
        entry.update(id=call.id, type="function")
        function["name"] = call.name
    entry["function"] = function
    return entry
