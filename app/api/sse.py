"""The one server-sent-events encoder: a JSON payload (or OpenAI's bare `[DONE]`) as one `data:` event."""

from __future__ import annotations

from typing import Any

from app.api.jsonbody import dumps


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else dumps(payload)
    return b"data: " + data + b"\n\n"
