"""Bearer-key authentication for /v1/* (and /metrics when asked), as a pure ASGI middleware.

Pure ASGI so a refused request costs no routing, body parsing or audio decoding. The key
sent is compared with every configured key in constant time, never stopping at the first
match, so response timing tells nothing about which key (or how much of one) was right.
Keys are never logged: the access line records the path, not the headers.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.middleware import is_api_path, send_error
from app.config import Settings
from app.errors import AuthenticationError

log = logging.getLogger(__name__)


class ApiKeyFileError(ValueError):
    """--api-key-file is missing, unreadable or holds no key: refusing to start beats running open."""


def read_key_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ApiKeyFileError(f"cannot read --api-key-file {path}: {exc.strerror or exc}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ApiKeyFileError(f"--api-key-file {path} holds no key (blank lines and # comments are ignored)")
    return keys


def load_api_keys(settings: Settings) -> list[str]:
    """--api-keys plus the lines of --api-key-file, deduplicated, in order."""
    keys = list(settings.api_keys)
    if settings.api_key_file is not None:
        keys += read_key_file(settings.api_key_file)
    return list(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may well resolve to a public address


def warn_if_open(settings: Settings, keys: list[str]) -> None:
    if not keys and not is_loopback(settings.host):
        log.warning(
            "No API key configured and bound to %s: anyone who can reach this port can use the model. "
            "Set --api-key-file or --api-keys (VOXTRAL_API_KEY_FILE / VOXTRAL_API_KEYS).",
            settings.host,
        )


SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
"""Browsers cannot set headers on a WebSocket: OpenAI's clients send the key as this subprotocol instead."""


class ApiKeyAuth:
    """401 in OpenAI's shape unless `Authorization: Bearer <key>` matches a configured key. A WebSocket upgrade
    may carry the key as an `openai-insecure-api-key.<key>` subprotocol instead; a refused one gets the 401 as
    its denial response."""

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool = False) -> None:
        self.app = app
        self.keys = [k.encode("utf-8") for k in keys]
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or not self.keys or not self._protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        presented = _bearer(dict(scope.get("headers", [])).get(b"authorization"))
        if presented is None and kind == "websocket":
            presented = _subprotocol_key(scope.get("subprotocols", []))
        if presented is None:
            error = AuthenticationError("Missing API key: send it as `Authorization: Bearer <key>`.")
        elif not self._valid(presented):
            error = AuthenticationError("Incorrect API key provided.")
        else:
            return await self.app(scope, receive, send)
        await send_error(send, error, {"www-authenticate": "Bearer"}, websocket=kind == "websocket")

    def _protected(self, path: str) -> bool:
        return is_api_path(path) or (self.protect_metrics and path == "/metrics")

    def _valid(self, presented: bytes) -> bool:
        matched = False
        for key in self.keys:  # every key, every time: no early exit
            matched |= hmac.compare_digest(presented, key)
        return matched


def _subprotocol_key(subprotocols: list[str]) -> bytes | None:
    keys = [p[len(SUBPROTOCOL_PREFIX) :] for p in subprotocols if p.startswith(SUBPROTOCOL_PREFIX)]
    return keys[0].encode("utf-8") if keys and keys[0] else None


def _bearer(header: bytes | None) -> bytes | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None
