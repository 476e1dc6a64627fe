"""`build_api`: the HTTP face of the server (routes, error mapping, OpenAPI, middleware) as one FastAPI app.

What the routes use is built elsewhere (`app.wiring`), in the `lifespan` given here, and reaches them
through the `context` dependency (`app.api.context`).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import Lifespan

from app.api import errors, openapi
from app.api.auth import ApiKeyAuth, load_api_keys, warn_if_open
from app.api.demo import RandomWeightsHeader
from app.api.lifecycle import DrainGuard, Lifecycle
from app.api.middleware import BodyLimits, RequestContext, Route
from app.api.realtime import route as realtime
from app.api.routes import audio, chat, health, models, playground, responses
from app.config import Settings
from app.metrics import Metrics


def build_api(settings: Settings, metrics: Metrics, lifecycle: Lifecycle, lifespan: Lifespan[FastAPI]) -> FastAPI:
    """The routes and the middleware; `lifespan` builds what they use and yields it as the app's state."""
    app = FastAPI(title="voxtral-server", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    openapi.install(app)
    routers = (audio.router, chat.router, responses.router, models.router, health.router)
    for router in routers:
        app.include_router(router)
    app.include_router(realtime.router)
    if settings.playground:
        playground.install(app)
    routes = [(r.path_regex, r.path_format) for router in routers for r in router.routes if isinstance(r, APIRoute)]
    install_middleware(app, settings, metrics, lifecycle, routes)
    return app


def install_middleware(
    app: FastAPI, settings: Settings, metrics: Metrics, lifecycle: Lifecycle, routes: list[Route]
) -> None:
    """Outermost first: log/metrics see every answer, auth runs before draining and body checks."""
    keys = load_api_keys(settings)
    warn_if_open(settings, keys)
    body_limit = settings.max_upload_bytes * 4 // 3 + 1024 * 1024  # base64 in JSON is 4/3 the file
    app.add_middleware(BodyLimits, max_bytes=body_limit, timeout_s=settings.body_read_timeout_s)
    app.add_middleware(DrainGuard, lifecycle=lifecycle)
    app.add_middleware(RandomWeightsHeader)
    app.add_middleware(ApiKeyAuth, keys=keys, protect_metrics=settings.metrics_require_key)
    app.add_middleware(RequestContext, metrics=metrics, routes=routes, log_prompts=settings.log_prompts)
