"""`AppContext`: everything the routes and sockets of one app use, in one frozen value; `Startup`: what
exists before it, from the moment the server listens.

`app.wiring` yields a `Startup` as the lifespan's state at once, then loads the model in the background and
sets `Startup.context` once, when it is built; the server copies the state into every connection's scope,
where the `startup` and `context` dependencies read it. Nothing else is shared between routes: no
attributes on `app.state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection
from starlette.types import Scope

from app.api.lifecycle import Lifecycle
from app.config import Settings
from app.errors import ModelNotReady
from app.metrics import Metrics
from app.serving.front import Front
from app.serving.realtime.service import RealtimeServing
from app.serving.responses import ResponsesServing

STATE_KEY = "ctx"
"""The key of the context in the lifespan's state (and so in each connection's `state`)."""


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    metrics: Metrics
    lifecycle: Lifecycle
    serving: Front
    """`Serving`, or `StreamingServing` for a Voxtral Realtime model (transcription only)."""
    realtime: RealtimeServing
    responses: ResponsesServing
    created: int
    """Unix time the app was built: the `created` of /v1/models."""
    random_weights: bool = False
    """The model's weights are random (the built-in tiny demo): every answer says so (`RANDOM_WEIGHTS_HEADER`)."""


class Startup:
    """What /health, /ready and /metrics read while the model loads: settings, metrics, the lifecycle
    (ready, draining, what start-up is doing), and `context`, set once when start-up has built it."""

    def __init__(self, settings: Settings, metrics: Metrics, lifecycle: Lifecycle) -> None:
        self.settings, self.metrics, self.lifecycle = settings, metrics, lifecycle
        self.context: AppContext | None = None


RANDOM_WEIGHTS_HEADER = "x-voxtral-random-weights"
"""`true` on every /v1 answer (and realtime upgrade) of a model with random weights: its output is noise."""


def random_weights(scope: Scope) -> bool:
    """Whether the app behind this connection serves random weights (False until its model has loaded)."""
    state = scope.get("state", {}).get(STATE_KEY)
    return isinstance(state, Startup) and state.context is not None and state.context.random_weights


def startup(conn: HTTPConnection) -> Startup:
    """The app's start-up state (a FastAPI dependency); 503 model_not_ready where no lifespan ran."""
    state = conn.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(state, Startup):
        raise ModelNotReady("The server has not started yet; retry shortly.")
    return state


def context(conn: HTTPConnection) -> AppContext:
    """The app's context (a FastAPI dependency); 503 model_not_ready until start-up has built it."""
    ctx = startup(conn).context
    if ctx is None:
        raise ModelNotReady("The model is still loading; retry shortly.")
    return ctx


Context = Annotated[AppContext, Depends(context)]
"""A route's or socket's parameter type: `ctx: Context`."""
Started = Annotated[Startup, Depends(startup)]
"""The parameter type of what answers while the model loads (probes, metrics): `state: Started`."""
