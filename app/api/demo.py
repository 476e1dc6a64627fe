"""The built-in demo model says so where users look: a header on every /v1 answer of random weights."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.context import RANDOM_WEIGHTS_HEADER, random_weights
from app.api.middleware import is_api_path


class RandomWeightsHeader:
    """`x-voxtral-random-weights: true` on every /v1 answer of a model with random weights (the built-in tiny
    demo), so a client, a proxy or the playground can tell noise from a model's output."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope.get("path", "")) or not random_weights(scope):
            return await self.app(scope, receive, send)

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((RANDOM_WEIGHTS_HEADER.encode(), b"true"))
            await send(message)

        await self.app(scope, receive, marked)
