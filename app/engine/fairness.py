"""Fair sharing between owners (clients: an API key, a client address): whose waiting requests go first.

An owner is `client` or `client/part`: a part is one of the client's realtime sessions, each its own line
within the client's share. Each waiting request gets a round: how many requests its client already has in
the worker (running, prefilling or parked) plus how many of its own wait ahead of it, where the client's
requests are lined up round-robin across its parts. Requests are served by round, then by age: round-robin
across clients, then across one client's parts, oldest first within a part; a client that already holds many
rows goes after those that hold few. So a flood from one client, from however many sessions, costs the
others only the shared compute, and a flood from one session costs that client's other sessions the same.
Pure functions: tested on their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

PART = "/"
"""Between a client and a part of it in an owner: `key:1a2b.../sess_...`."""


def client_of(owner: str) -> str:
    """The client an owner belongs to (the owner itself when it names no part): the per-client cap counts by it."""
    return owner.partition(PART)[0]


def part_of(client: str, part: str) -> str:
    """The owner of a client's part (a realtime session): its own line, within the client's share."""
    return f"{client}{PART}{part}"


def fair_order(owners: Sequence[str], held: Mapping[str, int] | None = None) -> tuple[list[int], list[int]]:
    """`owners`: each waiting request's owner, oldest first; `held`: requests each owner has in the worker.
    Returns (order, rounds): the indices in the order they are served, and the round of each, in that order.
    The order is stable: one owner's requests keep their age order, and so do ties between clients."""
    parts = _rounds(owners, Counter(held or {}))
    by_client: dict[str, list[int]] = {}
    for i in sorted(range(len(owners)), key=lambda i: (parts[i], i)):  # each client's line, round-robin by part
        by_client.setdefault(client_of(owners[i]), []).append(i)
    clients = Counter[str]()
    for owner, count in (held or {}).items():
        clients[client_of(owner)] += count
    rounds = [0] * len(owners)
    for client, line in by_client.items():
        for place, i in enumerate(line):
            rounds[i] = clients[client] + place
    order = sorted(range(len(owners)), key=lambda i: (rounds[i], i))
    return order, [rounds[i] for i in order]


def _rounds(owners: Sequence[str], counts: Counter[str]) -> list[int]:
    """Each request's round among its own owner's: those it holds in the worker plus those waiting ahead."""
    rounds = []
    for owner in owners:
        rounds.append(counts[owner])
        counts[owner] += 1
    return rounds


def over_share(queued: int, wanted: int, cap: int | None) -> bool:
    """Whether a client holding `queued` places may not take `wanted` more under `cap` (None: no cap).
    A client holding none may always queue one group, however many pieces it has: the cap never makes a
    request impossible, it only makes one client wait for its own."""
    return cap is not None and queued > 0 and queued + wanted > cap
