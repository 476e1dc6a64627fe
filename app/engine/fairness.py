"""Fair sharing between owners (clients: an API key, a realtime session): whose waiting requests go first.

Each waiting request gets a round: how many requests its owner already has in the worker (running,
prefilling or parked) plus how many of its own wait ahead of it. Requests are served by round, then by
age: round-robin across owners, oldest first within one, and an owner that already holds many rows goes
after those that hold few. So a flood from one owner costs the others only the shared compute: their
next request is always in an earlier round than the flood's. Pure functions: tested on their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence


def fair_order(owners: Sequence[str], held: Mapping[str, int] | None = None) -> tuple[list[int], list[int]]:
    """`owners`: each waiting request's owner, oldest first; `held`: requests each owner has in the worker.
    Returns (order, rounds): the indices in the order they are served, and the round of each, in that order.
    The order is stable: one owner's requests keep their age order, and so do ties between owners."""
    counts = Counter(held or {})
    rounds: list[int] = []
    for owner in owners:
        rounds.append(counts[owner])
        counts[owner] += 1
    order = sorted(range(len(owners)), key=lambda i: (rounds[i], i))
    return order, [rounds[i] for i in order]


def over_share(queued: int, wanted: int, cap: int | None) -> bool:
    """Whether an owner holding `queued` places may not take `wanted` more under `cap` (None: no cap).
    An owner holding none may always queue one group, however many pieces it has: the cap never makes a
    request impossible, it only makes one client wait for its own."""
    return cap is not None and queued > 0 and queued + wanted > cap
