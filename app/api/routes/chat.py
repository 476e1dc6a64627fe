"""POST /v1/chat/completions: audio parts, several turns, text only, tools; JSON or SSE."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api import render
from app.api.chat_events import ChatEvents
from app.api.clients import client_key
from app.api.context import Context
from app.api.disconnect import StoppingStream, client_closed, unless_gone
from app.api.jsonbody import JSONBody
from app.api.record import record_of
from app.serving.schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["chat"])


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "chat.completion, or chat.completion.chunk events", "content": {"text/event-stream": {}}}
}


@router.post("/chat/completions", response_model=None, responses=_ANSWERS)
async def chat_completions(request: Request, body: ChatCompletionRequest, ctx: Context) -> Response:
    serving = ctx.serving
    answer = await serving.chat(body, record_of(request), client_key(request, ctx.settings))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = ChatEvents(body.model, serving.fingerprint, include_usage).render(answer.deltas())
        return StoppingStream(events, stop=answer.cancel, headers={"Cache-Control": "no-cache"})
    result = await unless_gone(request, answer.result())  # a client gone cancels the work at once
    if result is None:
        return client_closed()
    return JSONBody(render.chat_completion(result, body.model, serving.fingerprint))
