"""`GET /v1/realtime` (WebSocket): admit the session (model, session limit), then pump events between the
socket and the serving layer's `Session`: one reader, one writer, a bounded outbox between them. The reader
is paced (`--realtime-max-events-per-s`, pace.py): a client sending faster has its socket left unread a while.

A refused upgrade is an HTTP answer in OpenAI's error shape (ASGI's WebSocket denial response). A session
ends when the client leaves (its pending utterances are cancelled), or after the idle timeout, at the maximum
session length or on a drain (each answers every committed utterance first, then closes cleanly; the first
two after an `error` event saying why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app.api.clients import client_key
from app.api.context import RANDOM_WEIGHTS_HEADER, Context
from app.api.errors import error_response
from app.api.jsonbody import dumps
from app.api.lifecycle import Lifecycle
from app.api.realtime import protocol as wire
from app.api.realtime.pace import TokenBucket
from app.config import Settings
from app.errors import InternalError, InvalidRequest, VoxtralError
from app.serving.realtime import events as ev
from app.serving.realtime.events import ConnectionGone
from app.serving.realtime.service import RealtimeServing

log = logging.getLogger(__name__)
router = APIRouter(tags=["realtime"])
GOING_AWAY = 1001
"""The close code of a session ended by a drain (the client should reconnect, to another replica) or at the
maximum session length (as OpenAI closes its sessions: reconnect for a new one)."""
INTERNAL_ERROR = 1011
"""The close code of a session ended by a bug in this server (logged with its traceback)."""
SLOW_READER = 1008
"""The close code of a session whose client left more than --realtime-max-pending-mb of events unread."""


class SlowReader(ConnectionGone):
    """The client reads too slowly: its unread events passed the byte bound."""


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, ctx: Context) -> None:
    service = ctx.realtime
    try:
        service.admit(websocket.query_params.get("model"))
    except VoxtralError as exc:
        return await _deny(websocket, exc)
    try:
        offered = websocket.scope.get("subprotocols", [])
        marked = [(RANDOM_WEIGHTS_HEADER.encode(), b"true")] if ctx.random_weights else None
        await websocket.accept(subprotocol="realtime" if "realtime" in offered else None, headers=marked)
        client = client_key(websocket, ctx.settings)
        connection = Connection(websocket, service, ctx.settings, ctx.lifecycle, client)
        code = await connection.run()
        log.info("realtime session %s ended (close code %d; 0: the client left)", connection.session.id, code)
    finally:
        service.leave()


async def _deny(websocket: WebSocket, exc: VoxtralError) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(exc))
    else:  # a server without the denial extension: the close reason is all a client will see
        await websocket.close(code=1008 if exc.status < 500 else 1013, reason=exc.message[:120])


class Connection:
    def __init__(
        self, websocket: WebSocket, service: RealtimeServing, settings: Settings, lifecycle: Lifecycle, client: str
    ) -> None:
        """`client`: the opaque key of the client (its API key's hash, or its address): the sessions of one
        client share its places in the queue."""
        self.ws, self.settings, self.lifecycle = websocket, settings, lifecycle
        self.metrics = service.metrics
        self.pace = TokenBucket(settings.realtime_max_events_per_s, settings.realtime_events_burst)
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue(settings.realtime_max_pending_events)
        self.unsent = 0
        """Bytes of the events in the outbox and the one being sent: at most --realtime-max-pending-mb."""
        self.too_slow = asyncio.Event()
        """Set once the client left too much unread: every later event is refused and the reader stops."""
        self.closed = False
        self.close_reason = ""
        """The reason sent with a clean close (the session length limit's message)."""
        self.session = service.session(self.emit, client)

    async def emit(self, event: ev.Event) -> None:
        """Queue a session's event as its server event; waits while the outbox is full (a slow client),
        raises ConnectionGone once the client is gone."""
        await self._put(wire.render(event))

    async def _put(self, message: dict[str, Any] | None) -> None:
        """Queue one server event (None: the end), serialised now so that the outbox is counted in bytes.
        Raises ConnectionGone once the client is gone, SlowReader once it leaves too much unread."""
        if self.closed:
            raise ConnectionGone
        if self.too_slow.is_set():
            raise SlowReader
        text = dumps(message).decode() if message is not None else None
        size = len(text) if text is not None else 0
        if self.unsent and self.unsent + size > self.settings.realtime_max_pending_bytes:
            self.too_slow.set()
            raise SlowReader
        self.unsent += size
        await self.outbox.put(text)

    async def run(self) -> int:
        """The session, from session.created to its close code (0: the client left first)."""
        writer = asyncio.create_task(self._write())
        code = 1000
        try:
            await self.session.start()
            code = await self._read()
            if code in (1000, GOING_AWAY):  # idle or draining: answer what was committed, then end the writes
                await self.session.close(flush=True)
                await self._put(None)
                await writer
        except SlowReader:
            code = SLOW_READER
        except ConnectionGone:
            code = 0
        except Exception:  # a bug: close with 1011, and leave no task of the session pending
            log.exception("realtime session %s failed", self.session.id)
            code = INTERNAL_ERROR
        finally:
            if code == SLOW_READER:
                limit = self.settings.realtime_max_pending_mb
                log.warning(
                    "realtime session %s: its client left over %g MB unread: closed (1008)", self.session.id, limit
                )
            if code in (0, INTERNAL_ERROR, SLOW_READER):
                self.session.cancel()
            self.session.release()
            writer.cancel()
            with contextlib.suppress(Exception):
                if code and self.ws.application_state == WebSocketState.CONNECTED:
                    reason = "slow reader: too many events unread" if code == SLOW_READER else self.close_reason
                    await self.ws.close(code=code, reason=reason)
        return code

    async def _read(self) -> int:
        """Hand client events to the session until the client leaves (0), goes idle (1000), a drain starts or
        the session reaches its maximum length (1001). A pending receive is never cancelled while the session
        goes on: that could lose a message."""
        stopping = asyncio.ensure_future(self.lifecycle.stopping.wait())
        too_slow = asyncio.ensure_future(self.too_slow.wait())
        receive: asyncio.Future[Any] | None = None
        clock = asyncio.get_running_loop().time
        deadline = clock() + self.settings.realtime_max_session_s
        try:
            while True:
                if clock() >= deadline:
                    return await self._expired()
                receive = receive or asyncio.ensure_future(self.ws.receive())
                wait = min(self.settings.realtime_idle_timeout_s, deadline - clock())
                wake = {receive, stopping, too_slow}
                done, _ = await asyncio.wait(wake, timeout=wait, return_when="FIRST_COMPLETED")
                if too_slow in done:
                    return SLOW_READER
                if stopping in done:
                    return GOING_AWAY
                if receive not in done:
                    if self.session.unanswered or clock() >= deadline:  # waiting for transcriptions is not idle
                        continue
                    return await self._idle()
                message, receive = receive.result(), None
                if message["type"] == "websocket.disconnect":
                    return 0
                await self._handle(message)
                if pause := self.pace.take():
                    await self._paced(pause, stopping, too_slow)
        finally:
            stopping.cancel()
            too_slow.cancel()
            if receive is not None:
                receive.cancel()

    async def _paced(self, pause: float, *wake: asyncio.Future[Any]) -> None:
        """The client is past --realtime-max-events-per-s: leave its socket unread for `pause` s (uvicorn stops
        reading it, so TCP slows the client), or until a drain or a slow-reader close wakes the reader."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait(wake, timeout=pause)
        self.metrics.realtime_throttled_seconds.inc(loop.time() - started)
        self.metrics.realtime_throttled_events.inc()

    async def _expired(self) -> int:
        """The session reached --realtime-max-session-s: say so, then end it as a drain does (1001, the message as
        the close reason): OpenAI closes a session at its 60-minute limit with 1001 (going away) and that text."""
        limit = self.settings.realtime_max_session_s
        error = InvalidRequest(f"Your session hit the maximum duration of {limit:g} seconds.", code="session_expired")
        await self.emit(ev.Error(error))
        self.close_reason = error.message
        return GOING_AWAY

    async def _idle(self) -> int:
        idle = self.settings.realtime_idle_timeout_s
        await self.emit(
            ev.Error(InvalidRequest(f"The session sent nothing for {idle:g} s and is closed.", code="idle_timeout"))
        )
        return 1000

    async def _handle(self, message: MutableMapping[str, Any]) -> None:
        text = message.get("text")
        if text is None:
            error = InvalidRequest("Binary messages are not supported: send each event as JSON text.")
            return await self.emit(ev.Error(error))
        if len(text) > self.settings.realtime_max_message_bytes:
            error = InvalidRequest(
                f"The event is larger than the {self.settings.realtime_max_message_mb:g} MB limit: send audio in "
                "smaller chunks.",
                code="message_too_large",
            )
            return await self.emit(ev.Error(error))
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        except RecursionError:  # nested past the parser's recursion limit (no event nests deeper than 6)
            error = InvalidRequest("The event is nested too deeply to parse.", code="invalid_json")
            return await self.emit(ev.Error(error))
        if not isinstance(data, dict):
            return await self.emit(ev.Error(InvalidRequest("The event is not a JSON object.", code="invalid_json")))
        await self._command(data)

    async def _command(self, data: dict[str, Any]) -> None:
        """One client event, parsed into the session's command; a refused one is answered with an error
        event naming it, and the session goes on."""
        event_id = wire.event_id(data)
        try:
            command = wire.command(wire.parse(data))
        except VoxtralError as exc:
            return await self.emit(ev.Error(exc, event_id))
        except Exception:  # a bug must not drop the socket: say so, and go on
            log.exception("realtime session %s failed on a %r event", self.session.id, data.get("type"))
            return await self.emit(ev.Error(InternalError("The server had an internal error."), event_id))
        await self.session.handle(command)

    async def _write(self) -> None:
        try:
            while (text := await self.outbox.get()) is not None:
                async with asyncio.timeout(self.settings.realtime_idle_timeout_s):  # a reader that never reads
                    await self.ws.send_text(text)
                self.unsent -= len(text)
        except (WebSocketDisconnect, RuntimeError, TimeoutError, OSError) as exc:
            log.info("realtime session %s: client gone while sending (%s)", self.session.id, type(exc).__name__)
        finally:
            self.closed = True
            while not self.outbox.empty():  # wakes anyone waiting to put: they then see `closed`
                self.outbox.get_nowait()
