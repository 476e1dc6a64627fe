"""The Responses use case, on top of the chat use case: the request's input (after its stored
`previous_response_id` conversation) becomes chat messages, chat answers, and its typed result or deltas
become a `ResponseObject` or `ResponseDelta`s; a response asked to be stored (`store`, true by default) is
kept with its turn's messages once it is over.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from app.errors import ResponseNotFound, VoxtralError
from app.serving import responses_input
from app.serving.chat import ChatAnswer, Chats, ChoiceResult
from app.serving.deltas import Usage
from app.serving.record import RequestRecord
from app.serving.response_store import ResponseStore
from app.serving.responses_schemas import CreateResponseRequest
from app.serving.responses_stream import OutputStream
from app.serving.responses_values import (
    CallOut,
    Finished,
    MessageOut,
    OutputItem,
    ResponseDelta,
    ResponseObject,
    Started,
    TokenUsage,
    item_status,
    new_id,
)
from app.serving.schemas import Message

_CHAT_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class ResponseAnswer:
    """A queued response: wait for its `result()`, or stream its `deltas()`; `cancel()` stops it."""

    def __init__(self, started: ResponseObject, chat: ChatAnswer, turn: list[Message], store: ResponseStore | None):
        self.started, self._chat, self._turn, self._store = started, chat, turn, store

    async def result(self) -> ResponseObject:
        result = await self._chat.result()
        choice = result.choices[0]
        usage = TokenUsage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
        return await self._finish(output_items(choice), choice.finish_reason, usage)

    async def deltas(self) -> AsyncIterator[ResponseDelta]:
        """Started, then the output items as they open, grow and close, then Finished (stored by then)."""
        yield Started(self.started)
        stream, usage = OutputStream(), None
        async for delta in self._chat.deltas():
            if isinstance(delta, Usage):
                usage = TokenUsage(delta.prompt_tokens, delta.completion_tokens, delta.cached_tokens)
            for out in stream.push(delta):
                yield out
        yield Finished(await self._finish(tuple(stream.items), stream.finish_reason, usage))

    def cancel(self) -> None:
        self._chat.cancel()

    async def _finish(
        self, output: tuple[OutputItem, ...], finish_reason: str, usage: TokenUsage | None
    ) -> ResponseObject:
        complete = finish_reason != "length"
        now = int(time.time())
        response = replace(
            self.started,
            status="completed" if complete else "incomplete",
            output=output,
            usage=usage,
            completed_at=now if complete else None,
        )
        if self._store is not None:
            await self._store.save(response, [*self._turn, responses_input.output_message(output)])
        return response


def output_items(choice: ChoiceResult) -> tuple[OutputItem, ...]:
    """A whole answer's output: its text as a message (an empty one where there is nothing else), then its calls."""
    status = item_status(choice.finish_reason)
    calls = tuple(CallOut(new_id("fc"), c.id, c.name, c.arguments, status) for c in choice.calls)
    if calls and not choice.content:
        return calls
    return (MessageOut(new_id("msg"), choice.content or "", status), *calls)


class ResponsesServing:
    """POST, GET and DELETE of /v1/responses, as typed calls."""

    def __init__(self, chats: Chats, store: ResponseStore) -> None:
        """`chats`: `ChatServing`, or a transcription-only model's refusal (every response is then a 400)."""
        self.chats, self.store = chats, store

    async def start(self, body: CreateResponseRequest, record: RequestRecord | None = None) -> ResponseAnswer:
        """Refused (a 4xx) before anything is queued where chat would refuse it, or where the
        previous response is gone."""
        history = await self.store.conversation(body.previous_response_id) if body.previous_response_id else []
        turn = responses_input.input_messages(body)
        try:
            answer = await self.chats.start(responses_input.chat_request(body, history + turn), record)
        except VoxtralError as exc:  # chat's refusals, with the parameter named as this request names it
            exc.param = _CHAT_PARAMS.get(exc.param or "", exc.param)
            raise
        return ResponseAnswer(ResponseObject(body), answer, turn, self.store if body.store is not False else None)

    async def get(self, response_id: str) -> ResponseObject:
        response = await self.store.get(response_id)
        if response is None:
            raise ResponseNotFound(f"Response with id {response_id!r} not found.", param="response_id")
        return response

    async def delete(self, response_id: str) -> None:
        if not await self.store.delete(response_id):
            raise ResponseNotFound(f"Response with id {response_id!r} not found.", param="response_id")

    def close(self) -> None:
        self.store.close()
