"""What joins the running batch this turn: parked rows first, then the queue, within the row cap and budgets.

`select_batch` (batcher.py) picks a group out of one list; this decides which list, how many places are
free and how long to wait. Plain numbers in, plain answers out: the worker applies them, tests call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from app.engine.batcher import select_batch
from app.engine.config import EngineConfig
from app.engine.oom import RowCap

Shape = tuple[int, int]
"""(rows, width) of the running batch: what the running-token budget is checked against."""

IDLE_POLL_S = 0.2
"""How long an idle worker waits for a first request before it looks at its stop flag again."""


@dataclass(frozen=True)
class Take:
    """What to ask the queue for (see `RequestQueue.take`)."""

    max_rows: int
    max_tokens: int
    timeout: float | None
    """Wait this long for a first request; None: do not wait."""
    min_age_s: float
    """A busy worker lets the oldest request wait this long for others to prefill with it."""
    running: Shape
    max_running_tokens: int | None
    held: Mapping[str, int] = field(default_factory=dict)
    """Requests each owner has in the worker already: its waiting ones come after others' (fairness.py)."""


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.cap = RowCap(config.max_batch_size)

    @property
    def limit(self) -> int:
        """The most rows that may run: the batch size, lower after running out of memory."""
        return self.cap.limit

    def readmit(self, parked: Sequence[int], running: Shape) -> list[int]:
        """Indices of the parked rows to prefill again now, chosen as the queue chooses: oldest first, within
        the free places and both token budgets. `parked`: each row's prompt plus what it generated."""
        free = self.limit - running[0]
        return select_batch(parked, free, self.config.max_batch_tokens, running, self.config.max_running_tokens)

    def takes_new(self, idle: bool) -> bool:
        """Continuous batching takes new requests every turn; static batching only into an empty batch."""
        return idle or self.config.continuous_batching

    def take(
        self, *, idle: bool, first: bool, held: int, running: Shape, owners: Mapping[str, int] | None = None
    ) -> Take:
        """The next queue take of this turn. Idle: no waiting for stragglers, and the first take waits a
        while for a request to come. Busy: the oldest may wait `max_wait_ms` for company. `owners`: the
        requests each owner has in the worker, for the fair order."""
        return Take(
            max_rows=self.limit - held,
            max_tokens=self.config.max_batch_tokens,
            timeout=IDLE_POLL_S if idle and first else None,
            min_age_s=0.0 if idle else self.config.max_wait_s,
            running=running,
            max_running_tokens=self.config.max_running_tokens,
            held=dict(owners or {}),
        )

    def fills_before_decoding(self) -> bool:
        """Static batching takes again until no place is left or nothing fits; continuous takes one group,
        so running rows stall for one prefill at most."""
        return not self.config.continuous_batching
