"""Pure ASGI middleware: body limits while reading, and one log line + metrics per request.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the
limits apply before the body is ever fully in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from re import Pattern
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, VoxtralError
from app.logs import FIELDS
from app.metrics import Metrics
from app.serving.record import RequestRecord

log = logging.getLogger("voxtral.access")

Route = tuple[Pattern[str], str]
"""A route's path regex and its template (`/v1/models/{model_id}`), for the endpoint label."""


async def send_error(
    send: Send, error: VoxtralError, headers: dict[str, str] | None = None, *, websocket: bool = False
) -> None:
    """A whole JSON error response in OpenAI's shape, for middleware that answers before the routes.
    `websocket`: the answer to a refused upgrade (ASGI's WebSocket denial response, which uvicorn supports)."""
    body = json.dumps(error.error_body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    prefix = "websocket.http" if websocket else "http"
    await send({"type": f"{prefix}.response.start", "status": error.status, "headers": raw})
    await send({"type": f"{prefix}.response.body", "body": body})


class _BodyTimeout(VoxtralError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class BodyLimits:
    """413 once a body passes `max_bytes` (whatever Content-Length claims), 408 when it has not all
    arrived `timeout_s` after the request started (a slow-loris client).

    The error is sent from here and the app is told the client left: raising instead would not
    work, because FastAPI turns any error while reading a body into a 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, self.too_large(), {"connection": "close"})
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        guard = _BodyGuard(receive, send, self, deadline)
        await self.app(scope, guard.receive, guard.send)

    def too_large(self) -> VoxtralError:
        mb = self.max_bytes / (1024 * 1024)
        return PayloadTooLarge(f"Request body is larger than the {mb:.0f} MB limit.")

    def too_slow(self) -> VoxtralError:
        return _BodyTimeout(f"The request body did not arrive within {self.timeout_s:g} s.")


class _BodyGuard:
    """The receive/send pair of one request under `BodyLimits`."""

    def __init__(self, receive: Receive, send: Send, limits: BodyLimits, deadline: float) -> None:
        self._receive, self._send, self.limits, self.deadline = receive, send, limits, deadline
        self.seen = 0
        self.body_done = self.refused = self.started = False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_done:  # e.g. a streaming response listening for the client going away
            return await self._receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            return await self._refuse(self.limits.too_slow())
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limits.max_bytes:
                return await self._refuse(self.limits.too_large())
            self.body_done = not message.get("more_body", False)
        return message

    async def _refuse(self, error: VoxtralError) -> Message:
        self.refused = True
        if not self.started:
            self.started = True
            await send_error(self._send, error, {"connection": "close"})
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # the app's answer to the disconnect we reported; ours already went out
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


class RequestContext:
    """Request id (from X-Request-ID or made), echoed back; a structured access line; request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[Route] = (), log_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        started, status, record = time.perf_counter(), 500, RequestRecord()
        scope.setdefault("state", {}).update(request_id=request_id, record=record)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, status, time.perf_counter() - started, record)

    def _record(self, scope: Scope, request_id: str, status: int, elapsed: float, record: RequestRecord) -> None:
        endpoint = endpoint_label(scope.get("path", ""), self.routes)
        if endpoint is not None:
            self._observe(endpoint, status, elapsed, record)
        line: dict[str, Any] = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path", ""),
            "endpoint": endpoint,
            "status": status,
            "duration_s": round(elapsed, 4),
            **record.summary(),
        }
        if self.log_prompts:
            line.update(record.texts())
        # Probes, scrapes (refused or not) and the playground's files arrive every few seconds: at info level
        # they would drown the /v1 request lines (docs/production.md: "probes and scrapes at debug").
        level = logging.INFO if endpoint is not None else logging.DEBUG
        log.log(level, "%s %s %d", line["method"], line["path"], status, extra={FIELDS: line})

    def _observe(self, endpoint: str, status: int, elapsed: float, record: RequestRecord) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.e2e_latency.labels(endpoint).observe(elapsed)
        if status < 400 and record.audio_seconds > 0:
            self.metrics.audio_seconds.inc(record.audio_seconds)
            self.metrics.rtf.observe(elapsed / record.audio_seconds)


def is_api_path(path: str) -> bool:
    """`/v1` and below: the paths that key checks, draining and per-endpoint metrics apply to."""
    return path == "/v1" or path.startswith("/v1/")


def endpoint_label(path: str, routes: Sequence[Route]) -> str | None:
    """The route template of a /v1 request (bounded label values), `unmatched` for no route; None off /v1.

    Matched here rather than read from the router's scope, so requests answered by a middleware
    (401, 503) before routing still get their endpoint.
    """
    if not is_api_path(path):
        return None
    return next((template for pattern, template in routes if pattern.match(path)), "unmatched")
