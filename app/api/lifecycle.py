"""Start-up, readiness and graceful drain: what /health and /ready report, and what happens to requests
while the model loads and during shutdown.

The server listens from its first second: while the model loads and warms up, /health answers 200
(`loading`), /ready 503 with the reason, and /v1 requests 503 `model_not_ready` with Retry-After, so a
probe or a load balancer can tell "starting" from "dead". On SIGTERM the server keeps its socket open
while it drains, so a client that arrives late gets a clear 503 `shutting_down` (and retries elsewhere)
instead of a connection error, and every request already accepted (being decoded, queued, running or
streaming) finishes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.middleware import is_api_path, send_error
from app.errors import ModelNotReady, ShuttingDown

log = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 5
"""Retry-After of a /v1 request refused while the model loads: loading takes seconds to minutes."""


class Drainable(Protocol):
    """What the HTTP drain needs of the engine behind it (`app.engine.Engine` is one, and a Voxtral Realtime
    model's `app.serving.realtime.streams.StreamLoop`)."""

    async def drain(self, timeout_s: float) -> bool:
        """Take no new work; True once nothing is left within `timeout_s`."""
        ...

    def stop(self) -> None:
        """Stop now: what is left is answered with an error."""
        ...


class Lifecycle:
    """Shared by /ready, `DrainGuard` and the signal handler. Touched only on the event loop."""

    def __init__(self) -> None:
        self.ready = False
        """Model loaded and warmed up."""
        self.stage = "starting"
        """What start-up is doing until ready ("loading the model", "warming up"): /ready's reason."""
        self.failed: str | None = None
        """Why the server cannot serve, once it cannot (its start-up failed, or its device did: `fail`): the
        server then exits."""
        self.draining = False
        self.in_flight = 0
        """Admitted /v1 requests whose response has not been fully sent yet."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopping = asyncio.Event()
        """Set when a drain starts: realtime sessions finish their last utterance and close."""

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining and self.failed is None

    def fail(self, reason: str) -> None:
        """The server can serve no more (`reason`: why, said by /ready): /health and /ready answer 503
        `failed`, and the server exits (app/server.py watches `failed`)."""
        self.failed = reason

    @property
    def status(self) -> str:
        """/health's and /ready's `status`: loading, ready, draining or failed."""
        if self.failed is not None:  # first: a device that fails during a drain still fails the probes
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.ready else "loading"

    @property
    def reason(self) -> str | None:
        """Why requests are refused now (None when serving)."""
        if self.failed is not None:
            return self.failed
        if self.draining:
            return "the server is shutting down"
        return None if self.ready else self.stage

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, engine: Drainable | None, timeout_s: float) -> bool:
        """Refuse new /v1 requests, then wait up to `timeout_s` for the admitted ones. True if all finished.

        HTTP requests are awaited first, not just the engine's queue: a request still decoding
        its audio has not reached the engine yet, and a streaming one is done only when sent.
        """
        self.draining = True
        self.stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        log.info("draining: %d request(s) in flight, up to %g s", self.in_flight, timeout_s)
        try:
            async with asyncio.timeout_at(deadline):
                await self._idle.wait()
        except TimeoutError:
            log.warning("drain timeout: %d request(s) still in flight get a 503 shutting_down", self.in_flight)
            if engine is not None:  # answer them now, with an error they can act on, not a cut connection
                await asyncio.to_thread(engine.stop)
            return False
        return await engine.drain(max(0.0, deadline - loop.time())) if engine is not None else True


class DrainGuard:
    """Counts admitted /v1 requests and WebSocket sessions; until the model is ready, answers new ones 503
    `model_not_ready` with Retry-After; once draining, 503 `shutting_down` (a WebSocket upgrade is refused
    with that response)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not is_api_path(path):
            return await self.app(scope, receive, send)
        if self.lifecycle.draining:
            error = ShuttingDown("The server is shutting down; retry the request on another replica.")
            headers = {"connection": "close", "retry-after": "1"}
            return await send_error(send, error, headers, websocket=scope["type"] == "websocket")
        if not self.lifecycle.ready:
            refused = ModelNotReady(f"The server is starting ({self.lifecycle.reason}); retry shortly.")
            headers = {"retry-after": str(LOADING_RETRY_AFTER_S)}
            return await send_error(send, refused, headers, websocket=scope["type"] == "websocket")
        self.lifecycle.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.leave()
