"""Pure ASGI middleware: body size limit while reading, and one log line + metrics per request.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the
limit applies before the body is ever fully in memory.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body
from app.metrics import Metrics

log = logging.getLogger("voxtral.access")


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """413 in OpenAI's shape once a body passes `max_bytes`, whatever Content-Length claims."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        mb = self.max_bytes / (1024 * 1024)
        body = json.dumps(
            error_body(
                f"Request body is larger than the {mb:.0f} MB limit.",
                "invalid_request_error",
                None,
                "payload_too_large",
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestContext:
    """Request id (from X-Request-ID or made), echoed back; a JSON access line; request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, status, time.perf_counter() - started)

    def _record(self, scope: Scope, request_id: str, status: int, elapsed: float) -> None:
        path: str = scope.get("path", "")
        endpoint = path if path.startswith("/v1/") else "other"
        if endpoint != "other":
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.e2e_latency.labels(endpoint).observe(elapsed)
        line: dict[str, Any] = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "duration_s": round(elapsed, 4),
        }
        line.update(scope.get("state", {}).get("log_extra", {}))
        log.info(json.dumps(line))
