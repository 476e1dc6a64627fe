"""Run an ASGI app under uvicorn with the limits a public server needs, and drain on SIGTERM.

Plain uvicorn closes its listening socket on the first SIGTERM, so a client arriving during
shutdown sees "connection refused", and it has no deadline for request headers, so a client
trickling header bytes holds a connection for ever. Here the first SIGTERM (or Ctrl+C) only
starts a drain (the socket stays open; the app answers new requests 503); uvicorn's own
shutdown follows once the drain is over, and the process exits 0. A second signal exits at once.
The app starts up in the background (the server listens while the model loads); when its start-up
fails (`failed()` turns true), the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.api.middleware import send_error
from app.config import Settings
from app.errors import TooManyConnections
from app.refusals import Throttle

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
"""Largest request head h11 buffers before answering 400 (uvicorn's default, made explicit)."""
_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"

Drain = Callable[[], Awaitable[object]]
Failed = Callable[[], bool]


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head, and OpenAI's error object
    (not uvicorn's plain-text 503) for a request over the connection limit.

    The clock starts when a connection opens or when the first byte of a later request on a
    keep-alive connection arrives (idle keep-alive stays uvicorn's business), and stops once
    the head is parsed. Subclassed per server by `protocol_class` to carry the timeout.
    """

    header_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check answers in plain text: take the limit over and answer in JSON.
        self.connection_limit, self.limit_concurrency = self.limit_concurrency, None
        self.app = self._limited(self.app)

    def _limited(self, app: ASGIApp) -> ASGIApp:
        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            limit = self.connection_limit
            # uvicorn counts before the request's task exists; here it is already in `tasks`.
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) > limit):
                log.warning("over --max-connections (%d): answered 503", limit)
                error = TooManyConnections(_OVER_LIMIT % limit)
                return await send_error(send, error, {"retry-after": "1", "connection": "close"})
            await app(scope, receive, send)

        return limited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._between_requests():
            self._arm()
        super().data_received(data)
        if not self._between_requests() or self.transport.get_protocol() is not self:
            self._disarm()  # a head is in, or the connection became a WebSocket (its own protocol now)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._between_requests() and self.conn.trailing_data[0]:
            self._arm()  # part of a pipelined head is already here
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self._between_requests() and not self.transport.is_closing():
            if self.conn.trailing_data[0]:  # a started head: say why; a silent one just closes
                self.transport.write(_TIMEOUT_408)
            self.transport.close()


WS_RECEIVE_BUFFER = 256 * 1024
"""Receive buffer of an upgraded WebSocket (Linux doubles it): under half a second of 100 ms appends read at
the pace's 200 events/s (1.3 MB/s), several seconds of a real-time client's audio."""

_OVER_LIMIT = "The server has too many open connections (limit %d); retry shortly, or reuse connections."


def protocol_class(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})


class QuietRefusalProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (the one it picks by default), with refused upgrades logged as info lines
    (uvicorn's `"WebSocket /v1/realtime" 401`), at most one per status every 10 s, none an error, no traceback.

    Anyone can knock without a key, so refusals (401, 404, 429, 503: ASGI's denial response) must cost the
    log next to nothing: a line that follows others held back says how many (`refusals`, one per server,
    set by `websocket_protocol`). uvicorn 0.54 never marks the handshake done once a denial response is
    sent, so every refusal also logged "ASGI callable returned without completing handshake." at error level
    (the fix proposed upstream in uvicorn PR #3138, done here); websockets' own "connection rejected" repeat
    of it is demoted to debug.

    An upgraded socket's receive buffer is fixed at `WS_RECEIVE_BUFFER`: when a session leaves its socket
    unread (its client past the pace, app/api/realtime/pace.py) the client's sends stop within that much,
    instead of after the tens of MB of kernel memory Linux's autotuning would grant; and its keepalive pongs,
    queued behind what waits unread, still come back well within the ping timeout.
    """

    refusals = Throttle()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WS_RECEIVE_BUFFER)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.logger = _RejectionsAtDebug(self.conn.logger, {})
        self.logger = _RefusalLines(self.logger, self.refusals)  # type: ignore[assignment]

    async def send(self, message: Message) -> None:  # type: ignore[override]
        await super().send(message)  # type: ignore[arg-type]
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True  # the denial is on the wire: the handshake is over, refused


class _RejectionsAtDebug(logging.LoggerAdapter):  # type: ignore[type-arg]
    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith("connection rejected"):
            level = min(level, logging.DEBUG)
        super().log(level, msg, *args, **kwargs)


_REFUSED = '%s - "WebSocket %s" %d'
"""uvicorn's line for an upgrade answered with an HTTP response (address, path, status)."""


class _RefusalLines(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's logger, with its refused-upgrade lines rate-limited per status by `throttle`."""

    def __init__(self, logger: logging.Logger, throttle: Throttle) -> None:
        super().__init__(logger, {})
        self.throttle = throttle

    @property
    def level(self) -> int:  # uvicorn reads `logger.level` to decide on its trace lines
        level: int = self.logger.level
        return level

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg == _REFUSED and len(args) == 3:
            held_back = self.throttle.allow(f"upgrade/{args[2]}")
            if held_back is None:
                return
            if held_back:
                msg, args = f"{_REFUSED} (%d more refused with it since the last line)", (*args, held_back)
        super().log(level, msg, *args, **kwargs)


def websocket_protocol() -> type[QuietRefusalProtocol]:
    """The WebSocket protocol of one server: its own rate limit on refusal lines."""
    return type("QuietRefusalProtocol", (QuietRefusalProtocol,), {"refusals": Throttle()})


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT runs `drain` before the usual shutdown, and that shuts
    down once `failed()` (the app's background start-up failed, or its device did while serving)."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float, failed: Failed = lambda: False
    ) -> None:
        super().__init__(config)
        self.drain, self.failed = drain, failed
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.failed():
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: uvicorn would re-raise SIGTERM at exit and the
        # process would die by the signal (status 143) instead of exiting 0 after a clean drain.
        if self.draining or self._loop is None:  # a second signal, or one before start-up: stop now
            self.force_exit = self.draining
            self.should_exit = True
            return
        self.draining = True
        log.info("received %s: draining for up to %g s", signal.Signals(sig).name, self.drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._run_drain())

    async def _run_drain(self) -> None:
        assert self._loop is not None
        started = self._loop.time()
        try:
            await self.drain()
        except Exception:
            log.exception("drain failed; shutting down now")
        finally:
            # What is left of the budget bounds uvicorn's wait for responses still being written.
            left = self.drain_timeout_s - (self._loop.time() - started)
            self.config.timeout_graceful_shutdown = max(1, math.ceil(left))
            self.should_exit = True


def build_server(app: object, settings: Settings, drain: Drain, failed: Failed = lambda: False) -> DrainingServer:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        http=protocol_class(settings.header_read_timeout_s),
        ws=websocket_protocol(),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # float works: call_later
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # Realtime events up to the limit get an error event from the app; far bigger ones are cut here, unread.
        ws_max_size=settings.realtime_max_message_bytes + 64 * 1024,
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    return DrainingServer(config, drain, settings.drain_timeout_s, failed)
