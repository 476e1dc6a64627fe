"""How fast the server reads one realtime client's events: a token bucket per connection.

A client may send `burst` events at once and `rate` a second sustained. Past that the reader waits for the
bucket to refill before it reads the socket again, so TCP's back-pressure slows the client down: a client
that sends too fast is paced, never refused, loses no event, and costs the event loop only what it reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`burst` tokens, refilled at `rate` a second; each event read spends one. Touched only on the event loop."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> float:
        """Spend a token for the event just read; returns how long to wait before reading the next (0: at once)."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate) - 1
        self.at = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate
