"""POST /v1/chat/completions: audio parts, several turns, text only, tools; JSON or SSE."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api import render
from app.api.chat_stream import ChatStream
from app.api.disconnect import StoppingStream, client_closed, unless_gone
from app.api.record import record_of
from app.api.schemas import ChatCompletionRequest
from app.api.service import Service

router = APIRouter(prefix="/v1", tags=["chat"])


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "chat.completion, or chat.completion.chunk events", "content": {"text/event-stream": {}}}
}


@router.post("/chat/completions", response_model=None, responses=_ANSWERS)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    service: Service = request.app.state.service
    record = record_of(request)
    with service.engine.admission() as reservation:
        job = await service.prepare_chat(body, record)
        item = service.submit_chat(job, stream=body.stream, reservation=reservation, record=record)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = ChatStream(job, body.model, service.fingerprint, include_usage).run(service.engine, item)
        return StoppingStream(events, stop=item.cancel, headers={"Cache-Control": "no-cache"})
    result = await unless_gone(request, service.engine.wait(item))
    if result is None:
        item.cancel()  # the worker drops the row before its next step
        return client_closed()
    return JSONResponse(render.chat_answer(job, result, body.model, service.fingerprint))
