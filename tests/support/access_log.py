"""Capture the access log's structured lines in tests."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from app.logs import JsonFormatter


class AccessLog(logging.Handler):
    """Collects access records. The line is written after the last byte is sent, so a test that
    has its response may be a moment early: `lines(n)` waits for n records instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.arrived:
            self.records.append(record)
            self.arrived.notify_all()

    def lines(self, n: int) -> list[dict[str, Any]]:
        """The first n access records as the JSON formatter writes them."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.records) >= n, timeout=10), self.records
        formatter = JsonFormatter()
        return [json.loads(formatter.format(r)) for r in self.records[:n]]
