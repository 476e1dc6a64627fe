"""`AppContext`: everything the routes and sockets of one app use, in one frozen value.

`app.wiring` builds it once, in the lifespan, and yields it as the lifespan's state; the server copies that
state into every connection's scope, where the `context` dependency reads it. Nothing else is shared
between routes: no attributes on `app.state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.api.lifecycle import Lifecycle
from app.config import Settings
from app.errors import ModelNotReady
from app.metrics import Metrics
from app.serving.realtime.service import RealtimeServing
from app.serving.service import Serving

STATE_KEY = "ctx"
"""The key of the context in the lifespan's state (and so in each connection's `state`)."""


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    metrics: Metrics
    lifecycle: Lifecycle
    serving: Serving
    realtime: RealtimeServing
    created: int
    """Unix time the app was built: the `created` of /v1/models."""


def context(conn: HTTPConnection) -> AppContext:
    """The app's context (a FastAPI dependency); 503 model_not_ready where no lifespan built one."""
    ctx = conn.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(ctx, AppContext):
        raise ModelNotReady("The server has not started yet; retry shortly.")
    return ctx


Context = Annotated[AppContext, Depends(context)]
"""A route's or socket's parameter type: `ctx: Context`."""
