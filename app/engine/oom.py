"""The out-of-memory row cap: after the model ran out of memory, how many rows may run.

Without a cap, a batch that failed at N rows would grow straight back to N as the queue refills it
and fail again. The cap halves with each failure and lets one more row in after every
`CLEAN_STEPS` decode steps that went through, until it reaches the configured batch size and
lifts. Plain numbers in and out: the worker reports what happened, tests drive it directly.
"""

from __future__ import annotations

CLEAN_STEPS = 64
"""Clean decode steps after which a capped batch lets one more row in."""


class RowCap:
    def __init__(self, max_rows: int, relax_after: int = CLEAN_STEPS) -> None:
        self.max_rows = max_rows
        self.relax_after = relax_after
        self.cap: int | None = None
        """The most rows that may run since the last out-of-memory error; None: no cap."""
        self._clean_steps = 0

    @property
    def limit(self) -> int:
        """The most rows that may run now: the batch size, or the cap while there is one."""
        return min(self.max_rows, self.cap or self.max_rows)

    def on_oom(self, rows: int) -> None:
        """`rows` is what may safely run now; a lower cap already in force stays."""
        self.cap = max(1, min(rows, self.cap or rows))
        self._clean_steps = 0

    def on_clean_step(self) -> None:
        if self.cap is None:
            return
        self._clean_steps += 1
        if self._clean_steps >= self.relax_after:
            self._clean_steps = 0
            self.cap = None if self.cap + 1 >= self.max_rows else self.cap + 1

    def reset(self) -> None:
        """Nothing runs any more: whatever ran out of memory is gone with it."""
        self.cap = None
        self._clean_steps = 0
