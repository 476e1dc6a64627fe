"""Stop work for a client that has gone away, on answers that are not streamed.

uvicorn does not cancel a handler when its client disconnects: a handler awaiting a long
generation would keep its rows decoding for nobody. Streamed answers notice on their next send;
a plain JSON answer has to listen for the disconnect itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

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


def client_closed() -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
