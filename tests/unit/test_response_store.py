"""The stored responses' database alone: round trip, chains, retention by age, count and size."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.errors import InvalidRequest
from app.serving.response_store import ResponseStore, Retention
from app.serving.responses_schemas import CreateResponseRequest
from app.serving.responses_values import CallOut, MessageOut, ResponseObject, TokenUsage
from app.serving.schemas import Message

LOOSE = Retention(max_age_s=3600, max_count=100, max_bytes=10**9)


def response(previous: str | None = None, created_at: int | None = None) -> ResponseObject:
    request = CreateResponseRequest.model_validate(
        {
            "model": "m",
            "previous_response_id": previous,
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
        }
    )
    output = (MessageOut("msg_1", "hello"), CallOut("fc_1", "abcdefghi", "f", "{}"))
    extra = {} if created_at is None else {"created_at": created_at}
    return ResponseObject(request, status="completed", output=output, usage=TokenUsage(3, 4), **extra)


def turn(text: str) -> list[Message]:
    return [Message(role="user", content=text), Message(role="assistant", content=text.upper())]


def store(tmp_path: Path, retention: Retention = LOOSE) -> ResponseStore:
    return ResponseStore(tmp_path / "sub" / "r.sqlite3", retention)


def test_round_trip_and_delete(tmp_path: Path) -> None:
    db, first = store(tmp_path), response()
    asyncio.run(db.save(first, turn("a")))
    assert asyncio.run(db.get(first.id)) == first
    assert asyncio.run(db.delete(first.id)) and asyncio.run(db.get(first.id)) is None
    assert not asyncio.run(db.delete(first.id))


def test_a_chain_oldest_first_and_a_broken_one(tmp_path: Path) -> None:
    db = store(tmp_path)
    a = response()
    b = response(previous=a.id)
    c = response(previous=b.id)
    for r, text in ((a, "a"), (b, "b"), (c, "c")):
        asyncio.run(db.save(r, turn(text)))
    assert [m.content for m in asyncio.run(db.conversation(c.id))] == ["a", "A", "b", "B", "c", "C"]
    asyncio.run(db.delete(b.id))
    with pytest.raises(InvalidRequest, match="deleted or has expired"):
        asyncio.run(db.conversation(c.id))
    with pytest.raises(InvalidRequest, match="not found"):
        asyncio.run(db.conversation("resp_nothing"))


def test_retention_by_count_and_size(tmp_path: Path) -> None:
    db = store(tmp_path, Retention(max_age_s=3600, max_count=2, max_bytes=10**9))
    saved = [response() for _ in range(3)]
    for r in saved:
        asyncio.run(db.save(r, turn("x")))
    assert [asyncio.run(db.get(r.id)) is not None for r in saved] == [False, True, True]
    db.retention = Retention(max_age_s=3600, max_count=100, max_bytes=100)  # one turn's messages: 66 bytes
    newest = response()
    asyncio.run(db.save(newest, turn("y")))
    assert [asyncio.run(db.get(r.id)) is not None for r in (*saved, newest)] == [False, False, False, True]


def test_retention_by_age(tmp_path: Path) -> None:
    db = store(tmp_path, Retention(max_age_s=60, max_count=100, max_bytes=10**9))
    old, new = response(created_at=1), response()
    asyncio.run(db.save(old, turn("o")))
    assert asyncio.run(db.get(old.id)) is None  # expired: never answered, pruned at the next write
    asyncio.run(db.save(new, turn("n")))
    assert asyncio.run(db.get(new.id)) == new
