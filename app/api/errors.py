"""The one place errors become HTTP responses in OpenAI's shape. No stack trace ever leaves."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import QueueFull, TooManySessions, VoxtralError, error_body

log = logging.getLogger(__name__)


def error_response(exc: VoxtralError) -> JSONResponse:
    """The HTTP answer to `exc` (a refused WebSocket upgrade too); a 429 says when to retry."""
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull | TooManySessions) else None
    return JSONResponse(exc.error_body(), exc.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "form")]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if "UploadFile" in message:  # FastAPI's wording names a Python class
        message = "must be sent as a file upload (a multipart part with a filename), not a text field"
    return f"Invalid request: {param or 'body'}: {message}", param


SERVED = "/v1/audio/transcriptions, /v1/audio/translations, /v1/chat/completions, /v1/realtime and /v1/models"
UNSERVED = {
    "/v1/audio/speech": "This server does not synthesise speech (Voxtral is a speech-to-text model). ",
}
"""OpenAI routes a client may try here that this server will not serve, and why."""


def unknown_route(method: str, path: str) -> str:
    """A 404's message, as OpenAI words it ("Invalid URL (POST /v1/x)"), saying what this server serves."""
    why = UNSERVED.get(path.rstrip("/"), "")
    return f"Invalid URL ({method} {path}): not found. {why}This server serves {SERVED}."


def install(app: FastAPI) -> None:
    @app.exception_handler(VoxtralError)
    async def _domain(request: Request, exc: VoxtralError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # Starlette's answer for a path no route has
            message = unknown_route(request.method, request.url.path)
        return JSONResponse(error_body(message, kind, None, None), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            error_body("The server had an internal error.", "server_error", None, "internal_error"), 500
        )
