"""The OpenAPI document says what the server really sends: OpenAI's error shape on the statuses
it uses (never FastAPI's 422, which the error handlers turn into 400), and every route, the realtime
WebSocket included (FastAPI leaves WebSocket routes out: it is described here by hand)."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.middleware import is_api_path

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "Invalid request (bad audio, bad field, unsupported option)",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "408": "The request body arrived too slowly",
    "413": "Upload or body over the size limit",
    "429": "The queue is full; retry after Retry-After seconds",
    "500": "The model failed while running this request",
    "503": "Not ready, or shutting down",
    "504": "The request did not finish within the request timeout",
}


REALTIME: dict[str, Any] = {
    "get": {
        "tags": ["realtime"],
        "summary": "Realtime transcription session (WebSocket)",
        "description": (
            "Upgrade to a WebSocket speaking OpenAI's realtime transcription events: input_audio_buffer.append "
            "in, conversation.item.input_audio_transcription.delta / .completed out (README: Realtime "
            "transcription). Subprotocol `realtime` offered by the OpenAI SDK is accepted. A refused upgrade is "
            "an HTTP answer in OpenAI's error shape."
        ),
        "operationId": "realtime_v1_realtime_get",
        "parameters": [
            {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}},
            {"name": "intent", "in": "query", "required": False, "schema": {"type": "string"}},
        ],
        "responses": {"101": {"description": "Switching Protocols: the session is open"}},
    }
}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
            schema["paths"]["/v1/realtime"] = copy.deepcopy(REALTIME)
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    _declare_errors(operation["responses"], is_api_path(path))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_errors(responses: dict[str, Any], api: bool) -> None:
    responses.pop("422", None)
    if not api:
        return
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for status, description in _ERRORS.items():
        responses.setdefault(status, {"description": description, "content": ref})
