"""Who an HTTP request is for the engine's fair sharing: an opaque client key, never a secret.

With API keys configured, a client is its key (the auth middleware has already checked it), named by the
first 12 hex digits of the key's SHA-256: stable across requests and replicas, useless to an attacker, and
fine in logs. Without keys, a client is its address (behind a proxy that is the proxy's: all one client).
Each realtime session is a client of its own (its session id), whatever its key.
"""

from __future__ import annotations

import hashlib

from starlette.requests import HTTPConnection

from app.config import Settings


def client_key(conn: HTTPConnection, settings: Settings) -> str:
    """`key:<hash>` when API keys are configured, `addr:<host>` otherwise."""
    if settings.api_keys or settings.api_key_file is not None:
        scheme, _, token = conn.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return "key:" + hashlib.sha256(token.strip().encode("utf-8")).hexdigest()[:12]
    host = conn.client.host if conn.client is not None else "-"
    return f"addr:{host}"
