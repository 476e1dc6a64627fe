"""POST /v1/responses (JSON or SSE), GET and DELETE /v1/responses/{id}: OpenAI's Responses API over the chat
use case (`app/serving/responses.py`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api import responses_render as render
from app.api.context import Context
from app.api.disconnect import StoppingStream, client_closed, unless_gone
from app.api.jsonbody import JSONBody
from app.api.record import record_of
from app.api.responses_events import ResponseEvents
from app.serving.responses_schemas import CreateResponseRequest

router = APIRouter(prefix="/v1", tags=["responses"])

_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "response, or Responses stream events", "content": {"text/event-stream": {}}}
}


@router.post("/responses", response_model=None, responses=_ANSWERS)
async def create_response(request: Request, body: CreateResponseRequest, ctx: Context) -> Response:
    answer = await ctx.responses.start(body, record_of(request))
    if body.stream:
        events = ResponseEvents().render(answer.deltas())
        return StoppingStream(events, stop=answer.cancel, headers={"Cache-Control": "no-cache"})
    result = await unless_gone(request, answer.result())  # a client gone cancels the work at once
    if result is None:
        return client_closed()
    return JSONBody(render.response(result))


@router.get("/responses/{response_id}")
async def get_response(response_id: str, ctx: Context) -> dict[str, Any]:
    return render.response(await ctx.responses.get(response_id))


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, ctx: Context) -> dict[str, Any]:
    await ctx.responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}
