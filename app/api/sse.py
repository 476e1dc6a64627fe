"""The one server-sent-events encoder: a JSON payload (or OpenAI's bare `[DONE]`) as one `data:` event."""

from __future__ import annotations

import json
from typing import Any


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
