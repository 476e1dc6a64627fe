"""POST /v1/chat/completions: audio parts, several turns, text only, tools; JSON or SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api import render
from app.api.chat_request import ChatJob
from app.api.disconnect import StoppingStream, client_closed, unless_gone
from app.api.schemas import ChatCompletionRequest
from app.api.service import Service
from app.engine.engine import Engine
from app.engine.work import WorkItem
from app.errors import VoxtralError, error_body
from app.model.detok import IncrementalDecoder, trim_at_stop
from app.model.toolcalls import chat_output, split_at_calls
from app.types import GenerationResult

router = APIRouter(prefix="/v1", tags=["chat"])


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "chat.completion, or chat.completion.chunk events", "content": {"text/event-stream": {}}}
}


@router.post("/chat/completions", response_model=None, responses=_ANSWERS)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    service: Service = request.app.state.service
    with service.engine.admission():
        job = await service.prepare_chat(body)
        item = service.engine.submit(job.prepared, stream=body.stream)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = ChatStream(job, body.model, service.fingerprint, include_usage).run(service.engine, item)
        return StoppingStream(events, stop=item.cancel, headers={"Cache-Control": "no-cache"})
    result = await unless_gone(request, service.engine.wait(item))
    if result is None:
        item.cancel()  # the worker drops the row before its next step
        return client_closed()
    stops = job.prepared.sampling.stop_strings
    output = chat_output(result.token_ids, result.finish_reason, job.vocab, job.tool_names, stops)
    answer = render.chat_completion(
        body.model, service.fingerprint, output, result.prompt_tokens, len(result.token_ids)
    )
    return JSONResponse(answer)


class ChatStream:
    """One streamed answer, under one id: content deltas as tokens come. From the first [TOOL_CALLS] on
    (tools on) tokens are held and read as calls when the turn ends, each call as one delta chunk, so a
    call is never sent and then taken back; a call that fails to parse is sent as text, as unstreamed."""

    def __init__(self, job: ChatJob, model: str, fingerprint: str, include_usage: bool) -> None:
        self.job, self.model, self.fingerprint, self.include_usage = job, model, fingerprint, include_usage
        self.id, self.created = render.new_id("chatcmpl"), int(time.time())
        self.stops = job.prepared.sampling.stop_strings
        self.decoder = IncrementalDecoder.from_bytes(job.vocab.bytes_of, self.stops)
        self.ids: list[int] = []
        self.held: list[int] | None = None

    async def run(self, engine: Engine, item: WorkItem) -> AsyncIterator[bytes]:
        yield self._chunk({"role": "assistant", "content": ""})
        try:
            async for event in engine.stream(item):
                delta = self._push(event.token_ids)
                if delta:
                    yield self._chunk({"content": delta})
                if self.decoder.stopped:
                    item.cancel()
                    break
        except VoxtralError as exc:
            yield render.sse(error_body(exc.message, exc.type, exc.param, exc.code))
            yield render.sse("[DONE]")
            return
        for chunk in self._end(item.result):
            yield chunk

    def _push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        if self.held is not None:
            self.held.extend(token_ids)
            return ""
        if self.job.tool_names is not None:
            token_ids, after = split_at_calls(token_ids, self.job.vocab)
            self.held = after or None
        return self.decoder.push(token_ids)

    def _end(self, result: GenerationResult | None) -> Iterator[bytes]:
        tail = self.decoder.flush()
        if tail:
            yield self._chunk({"content": tail})
        finish = "stop" if self.decoder.stopped or result is None else result.finish_reason
        if self.held:
            output = chat_output(self.ids, finish, self.job.vocab, self.job.tool_names, self.stops)
            for index, call in enumerate(output.calls):
                yield self._chunk({"tool_calls": [render.tool_call(call, index)]})
            if output.calls:
                finish = "tool_calls"
            else:
                text, stopped = trim_at_stop(self.job.vocab.text(self.held, keep_special=True), self.stops)
                if text:
                    yield self._chunk({"content": text})
                finish = "stop" if stopped else finish
        yield self._chunk({}, finish)
        if self.include_usage:
            chunk = render.chat_chunk(self.id, self.model, self.fingerprint, self.created, {}, None)
            chunk["choices"], chunk["usage"] = [], render.usage(self.job.prepared.prompt_tokens, len(self.ids))
            yield render.sse(chunk)
        yield render.sse("[DONE]")

    def _chunk(self, delta: dict[str, object], finish: str | None = None) -> bytes:
        return render.sse(render.chat_chunk(self.id, self.model, self.fingerprint, self.created, delta, finish))
