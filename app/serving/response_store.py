"""Stored responses (`store: true`): an embedded SQLite database, so `GET /v1/responses/{id}` and a follow-up's
`previous_response_id` work across restarts without a database server.

Each row keeps one response (its request without the input, status, output, usage) and the chat messages of
its turn: the input, audio included as sent, and the output as an assistant message. A follow-up's
conversation is the rows of its chain, oldest first, read in one recursive query; a chain with a deleted or
expired link is refused rather than answered with half its history.

Retention is bounded three ways, applied at every write: age, count and total size (audio makes rows large);
the oldest go first. Every call runs in a worker thread (`asyncio.to_thread`) on one connection behind a lock:
a write of a turn with minutes of audio is tens of MB, which must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.errors import InvalidRequest
from app.serving.responses_schemas import CreateResponseRequest
from app.serving.responses_values import CallOut, MessageOut, OutputItem, ResponseObject, TokenUsage
from app.serving.schemas import Message

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    previous_id TEXT,
    response TEXT NOT NULL,
    messages TEXT NOT NULL,
    size INTEGER NOT NULL
)
"""
_CHAIN = """
WITH RECURSIVE chain(id, previous_id, messages, depth) AS (
    SELECT id, previous_id, messages, 0 FROM responses WHERE id = ? AND created_at >= ?
    UNION ALL
    SELECT r.id, r.previous_id, r.messages, c.depth + 1 FROM responses r JOIN chain c ON r.id = c.previous_id
    WHERE r.created_at >= ? AND c.depth < 100000
)
SELECT previous_id, messages FROM chain ORDER BY depth DESC
"""
_PRUNE = (
    "DELETE FROM responses WHERE created_at < ?",
    "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM responses ORDER BY rowid DESC LIMIT -1 OFFSET ?)",
    "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM (SELECT rowid, SUM(size) OVER "
    "(ORDER BY rowid DESC) AS total FROM responses) WHERE total > ?)",
)


@dataclass(frozen=True)
class Retention:
    max_age_s: float
    max_count: int
    max_bytes: int


class ResponseStore:
    def __init__(self, path: Path, retention: Retention) -> None:
        """Opens (creates) the database; call from a thread (`open`) when the event loop runs."""
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self.retention = retention
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    @classmethod
    async def open(cls, path: Path, retention: Retention) -> ResponseStore:
        return await asyncio.to_thread(cls, path, retention)

    async def save(self, response: ResponseObject, messages: list[Message]) -> None:
        """Keep `response` and its turn's messages, then drop what retention no longer allows."""
        await asyncio.to_thread(self._save, response, messages)

    async def get(self, response_id: str) -> ResponseObject | None:
        return await asyncio.to_thread(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id)

    async def conversation(self, response_id: str) -> list[Message]:
        """Every message of the chain ending at `response_id`, oldest first; a 400 where it is gone."""
        return await asyncio.to_thread(self._conversation, response_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- in the worker thread -------------------------------------------------------------------------
    def _save(self, response: ResponseObject, messages: list[Message]) -> None:
        record = _encode(response)
        turn = json.dumps([m.model_dump(mode="json", exclude_none=True) for m in messages])
        row = (response.id, response.created_at, response.request.previous_response_id, record, turn)
        keep = self.retention
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", (*row, len(turn)))
            for statement, limit in zip(_PRUNE, (self._oldest(), keep.max_count, keep.max_bytes), strict=True):
                self._db.execute(statement, (limit,))
            self._db.execute("COMMIT")

    def _get(self, response_id: str) -> ResponseObject | None:
        with self._lock:
            query = "SELECT response FROM responses WHERE id = ? AND created_at >= ?"
            row = self._db.execute(query, (response_id, self._oldest())).fetchone()
        return None if row is None else _decode(response_id, row[0])

    def _delete(self, response_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def _conversation(self, response_id: str) -> list[Message]:
        oldest = self._oldest()
        with self._lock:
            rows = self._db.execute(_CHAIN, (response_id, oldest, oldest)).fetchall()
        if not rows:
            raise InvalidRequest(
                f"Previous response with id {response_id!r} not found (never stored, deleted or expired).",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if rows[0][0] is not None:
            raise InvalidRequest(
                f"The conversation of previous response {response_id!r} reaches back to {rows[0][0]!r}, which "
                "was deleted or has expired.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return [Message.model_validate(m) for _, turn in rows for m in json.loads(turn)]

    def _oldest(self) -> int:
        return int(time.time() - self.retention.max_age_s)


def _encode(response: ResponseObject) -> str:
    left_out = {"input", "cache_salt"}  # the input is kept as the turn; a tenant's salt is a secret, never on disk
    request = response.request.model_dump(mode="json", by_alias=True, exclude=left_out, exclude_none=True)
    items = [{"kind": type(item).__name__, **asdict(item)} for item in response.output]
    usage = asdict(response.usage) if response.usage is not None else None
    fields = {"created_at": response.created_at, "status": response.status, "completed_at": response.completed_at}
    return json.dumps({"request": request, "output": items, "usage": usage, "error": response.error, **fields})


def _decode(response_id: str, text: str) -> ResponseObject:
    data: dict[str, Any] = json.loads(text)
    usage = TokenUsage(**data["usage"]) if data["usage"] is not None else None
    return ResponseObject(
        CreateResponseRequest.model_validate(data["request"]),
        response_id,
        data["created_at"],
        data["status"],
        tuple(_item(i) for i in data["output"]),
        usage,
        data["completed_at"],
        data["error"],
    )


def _item(data: dict[str, Any]) -> OutputItem:
    kind = data.pop("kind")
    return MessageOut(**data) if kind == "MessageOut" else CallOut(**data)
