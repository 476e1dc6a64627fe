"""The request record `RequestContext` opens for each HTTP request, as route handlers find it."""

from __future__ import annotations

from starlette.requests import Request

from app.serving.record import RequestRecord


def record_of(request: Request) -> RequestRecord | None:
    """The record `RequestContext` opened for this request (None where no middleware opened one)."""
    record = getattr(request.state, "record", None)
    return record if isinstance(record, RequestRecord) else None
