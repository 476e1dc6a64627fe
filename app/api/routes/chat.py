"""POST /v1/chat/completions: audio parts, several turns, text only; JSON or SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.api import render
from app.api.schemas import ChatCompletionRequest
from app.api.service import Service
from app.errors import VoxtralError, error_body
from app.model.detok import IncrementalDecoder, trim_at_stop

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    service: Service = request.app.state.service
    prepared = await service.prepare_chat(body)
    stops = prepared.sampling.stop_strings
    if body.stream:
        item = service.engine.submit(prepared, stream=True)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(service, item, body.model, stops, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await service.engine.generate(prepared)
    text, stopped = trim_at_stop(service.decode(result.token_ids), stops)
    finish = "stop" if stopped else result.finish_reason
    body_out = render.chat_completion(body.model, text, finish, result.prompt_tokens, len(result.token_ids))
    return JSONResponse(body_out)


async def _stream(
    service: Service, item: object, model: str, stops: tuple[str, ...], include_usage: bool
) -> AsyncIterator[bytes]:
    from app.engine.work import WorkItem

    assert isinstance(item, WorkItem)
    chunk_id, created = render.new_id("chatcmpl"), int(time.time())
    yield render.sse(render.chat_chunk(chunk_id, model, created, {"role": "assistant", "content": ""}, None))
    decoder = IncrementalDecoder(service.decode, stops)
    try:
        async for event in service.engine.stream(item):
            delta = decoder.push(event.token_ids)
            if delta:
                yield render.sse(render.chat_chunk(chunk_id, model, created, {"content": delta}, None))
            if decoder.stopped:
                item.cancel()
                break
    except VoxtralError as exc:
        yield render.sse(error_body(exc.message, exc.type, exc.param, exc.code))
        yield render.sse("[DONE]")
        return
    tail = decoder.flush()
    if tail:
        yield render.sse(render.chat_chunk(chunk_id, model, created, {"content": tail}, None))
    result = item.result
    finish = "stop" if decoder.stopped or result is None else result.finish_reason
    yield render.sse(render.chat_chunk(chunk_id, model, created, {}, finish))
    if include_usage:
        prompt = item.request.prompt_tokens
        chunk = render.chat_chunk(chunk_id, model, created, {}, None)
        chunk["choices"], chunk["usage"] = [], render.usage(prompt, decoder.count)
        yield render.sse(chunk)
    yield render.sse("[DONE]")
