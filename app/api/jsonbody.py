"""JSON bodies and SSE payloads, encoded by pydantic-core's Rust encoder instead of the standard library's.

Why: the encoding runs on the event loop's thread, holding the GIL the model worker needs, and log-probs make
answers large; pydantic-core encodes them several times faster than `json.dumps`, which Starlette's
JSONResponse uses (docs/PERF.md, "HTTP"). Same JSON (UTF-8, not ASCII-escaped; shortest round-trip floats).
A NaN or infinity, which JSON has no spelling for, is written as null: the standard library's strict mode
would fail the whole answer with a 500 instead.
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi.responses import Response


def dumps(payload: Any) -> bytes:
    return pydantic_core.to_json(payload, inf_nan_mode="null")


class JSONBody(Response):
    """Starlette's JSONResponse with `dumps`."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
