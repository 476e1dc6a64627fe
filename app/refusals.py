"""Refusals of work that one client asked for beyond its share: counted, and logged at warning, rate-limited.

A flooding client is refused many times a second; each refusal is counted (`voxtral_refusals_total{reason}`),
but its owner gets at most one log line per `every_s`, which says how many were not logged since. Owners are
opaque keys (a realtime session id, a hash of an API key, a client address): never a secret.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.metrics import Metrics

log = logging.getLogger("app.refusals")

LOG_EVERY_S = 10.0
"""At most one warning per owner this often."""
_MAX_OWNERS = 4096
"""Owners remembered for the rate limit; past this, those not logged within `every_s` are forgotten."""


class Throttle:
    """Per key: allow one event every `every_s`, and count the ones held back in between. Any thread."""

    def __init__(self, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self._last: dict[str, tuple[float, int]] = {}
        """key -> (time of the last allowed event, events held back since)."""
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None: hold this one back. Otherwise go ahead; the number is how many were held back before it."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.every_s:
                self._last[key] = (last[0], last[1] + 1)
                return None
            if len(self._last) >= _MAX_OWNERS:
                self._forget(now)
            self._last[key] = (now, 0)
            return last[1] if last is not None else 0

    def _forget(self, now: float) -> None:
        self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every_s}


class Refusals:
    """Where refusals are noted: the metric by reason, and a rate-limited warning per owner."""

    def __init__(self, metrics: Metrics, throttle: Throttle | None = None) -> None:
        self.metrics, self.throttle = metrics, throttle or Throttle()

    def note(self, reason: str, owner: str, message: str) -> None:
        self.metrics.refusals.labels(reason).inc()
        held_back = self.throttle.allow(f"{reason}/{owner}")
        if held_back is not None:
            more = f" ({held_back} more refused since the last line)" if held_back else ""
            log.warning("refused (%s) for %s: %s%s", reason, owner or "-", message, more)
