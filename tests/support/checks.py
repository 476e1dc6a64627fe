"""Assertions tests share: OpenAI's error shape, and waiting for a condition no event announces."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    return dict(error)


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 15.0, poll_s: float = 0.01) -> None:
    """Poll a condition that no event announces (the worker's row count, the server closing a file)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(poll_s)
