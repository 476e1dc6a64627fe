"""Stop the work of a client that has gone away.

uvicorn does not cancel a handler when its client disconnects: a handler awaiting a long
generation would keep its rows decoding for nobody, so a plain JSON answer listens for the
disconnect itself. A streamed answer stops when its stream ends however it ends, including a
disconnect before its body generator ever started (its own `finally` would never run then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

CLIENT_CLOSED = 499
"""nginx's "client closed request": the status logged for an answer nobody reads."""


async def unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None if the client closed the connection first; `work` is then cancelled,
    which cancels its work items (their `finally`), so the worker drops their rows before the next step."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        gone.cancel()
        task.cancel()
        if gone.done() and not gone.cancelled():
            gone.exception()  # a receive that failed counts as gone; retrieved so asyncio does not warn


def client_closed() -> Response:
    return Response(status_code=CLIENT_CLOSED)


class StoppingStream(StreamingResponse):
    """Server-sent events that call `stop` when the response ends: after the last event (a no-op then),
    on a disconnect, or on an error."""

    def __init__(self, content: Any, stop: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.stop = stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stop()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
