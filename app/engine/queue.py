"""The one bounded queue between the event loop and the model worker.

Full means `QueueFull` (429) at once rather than an unbounded wait; one client past its share means
`RateLimited` (429) while the others still have room (an owner `client/part`, a realtime session, counts
against its client's share: fairness.py). Batches are taken in fair order, round-robin
across owners (fairness.py). Entries whose client went away, or whose deadline passed, are skipped when a
batch is taken, before they cost compute.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from app.engine.batcher import select_batch
from app.engine.fairness import client_of, fair_order, over_share
from app.engine.item import WorkItem
from app.engine.scheduler import Take
from app.errors import QueueFull, RateLimited, RequestTimeout, ShuttingDown


class RequestQueue:
    def __init__(
        self, max_size: int, on_change: Callable[[int], None] | None = None, *, max_per_owner: int | None = None
    ) -> None:
        self.max_size, self.max_per_owner = max_size, max_per_owner
        self._items: list[WorkItem] = []
        self._cond = threading.Condition()
        self._closed = False
        self._reserved: Counter[str] = Counter()
        """Places admitted but still being prepared (audio decoding, features), by client: they count as queued."""
        self._on_change = on_change or (lambda depth: None)

    def __len__(self) -> int:
        return len(self._items)

    def reserve(self, owner: str = "") -> None:
        """Claim a place before the expensive preparation, so an overloaded server refuses at once."""
        with self._cond:
            self._check_room(1, owner, 1)
            self._reserved[client_of(owner)] += 1

    def release(self, owner: str = "") -> None:
        with self._cond:
            self._unreserve(owner)

    def _unreserve(self, owner: str) -> None:
        client = client_of(owner)
        self._reserved[client] -= 1
        if self._reserved[client] <= 0:
            del self._reserved[client]

    def held_by(self, owner: str) -> int:
        """Places `owner`'s client holds (all its parts): queued requests and reservations."""
        with self._cond:
            return self._held(owner)

    def _held(self, owner: str) -> int:
        client = client_of(owner)
        return self._reserved[client] + sum(client_of(item.owner) == client for item in self._items)

    def _check_room(self, wanted: int, owner: str, group: int, reserved: bool = False) -> None:
        """`wanted` new places for a group of `group` requests of `owner` (`reserved`: one of them holds a
        reservation already, which is not counted against the owner's share)."""
        if self._closed:
            raise ShuttingDown("The server is shutting down and takes no new requests.")
        if len(self._items) + self._reserved.total() + wanted > self.max_size:
            raise QueueFull(f"The server is at capacity ({self.max_size} requests queued); retry shortly.")
        held = self._held(owner) - int(reserved)
        if over_share(held, group, self.max_per_owner):
            raise RateLimited(
                f"This client already has {held} requests waiting (at most {self.max_per_owner}); retry when "
                "some are answered."
            )

    def put(self, item: WorkItem) -> None:
        self.put_many([item])

    def put_many(self, items: list[WorkItem], *, reserved: bool = False) -> None:
        """All or nothing, under one lock: the pieces of one long file reach the batcher together. The items
        share one owner. `reserved`: the caller holds a place from `reserve()`, which these items now take over."""
        if not items:
            return
        owner = items[0].owner
        with self._cond:
            self._check_room(len(items) - int(reserved), owner, len(items), reserved)
            self._items.extend(items)
            if reserved:
                self._unreserve(owner)
            self._on_change(len(self._items))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def take(self, want: Take) -> list[WorkItem]:
        """Up to `want.max_rows` items within the token budgets (see `select_batch`); waits up to
        `want.timeout` for the first one.

        `want.min_age_s` lets a busy worker wait for stragglers so they prefill together, unless enough
        items to fill every free row are already here.
        """
        with self._cond:
            if want.timeout is not None and not self._items:
                self._cond.wait(want.timeout)
            self._drop_dead()
            if not self._items or want.max_rows <= 0:
                return []
            young = time.monotonic() - self._items[0].enqueued_at < want.min_age_s
            if young and len(self._items) < want.max_rows:
                return []
            order, rounds = fair_order([i.owner for i in self._items], want.held)
            waiting = [self._items[i] for i in order]
            lengths = [i.request.prompt_tokens for i in waiting]
            rows = [i.request.sampling.choices for i in waiting]
            chosen = select_batch(
                lengths, want.max_rows, want.max_tokens, want.running, want.max_running_tokens, rows, rounds
            )
            if not chosen:
                return []
            batch = [waiting[i] for i in chosen]
            taken = {id(item) for item in batch}
            self._items = [it for it in self._items if id(it) not in taken]
            self._on_change(len(self._items))
            return batch

    def discard(self, item: WorkItem) -> None:
        """An abandoned item gives its place back at once, not when the worker next takes a batch."""
        with self._cond:
            if item in self._items:
                self._items.remove(item)
                self._on_change(len(self._items))

    def drain_all(self) -> list[WorkItem]:
        with self._cond:
            items, self._items = self._items, []
            self._on_change(0)
            return items

    def _drop_dead(self) -> None:
        now = time.monotonic()
        alive = []
        for item in self._items:
            if item.cancelled:
                item.finish(RequestTimeout("The request was cancelled before it ran."))
            elif item.expired(now):
                item.finish(RequestTimeout("The request timed out waiting in the queue."))
            else:
                alive.append(item)
        if len(alive) != len(self._items):
            self._items = alive
            self._on_change(len(alive))
