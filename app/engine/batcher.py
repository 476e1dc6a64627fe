"""Which waiting requests run together: the oldest first, then those of similar length.

Grouping by prompt length (audio tokens included) keeps padding, and so wasted compute,
low; the oldest entry always goes in so nothing starves. Pure function: tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence


def select_batch(
    lengths: Sequence[int],
    max_rows: int,
    max_tokens: int,
    running: tuple[int, int] = (0, 0),
    max_running_tokens: int | None = None,
    rows: Sequence[int] | None = None,
    rounds: Sequence[int] | None = None,
) -> list[int]:
    """Indices (into `lengths`, oldest first) of the requests to prefill together.

    The padded cost of a group is rows x longest prompt; it must stay within `max_tokens`,
    except that the oldest request always goes, alone if it must.

    `running` is the batch already decoding (rows, width). A group joins it only if all its rows,
    padded to the widest one, stay within `max_running_tokens`: that is the KV cache every decode
    step reads, and one long prompt would otherwise pad every short row to its length. When the
    oldest request does not fit, nothing joins, so the batch drains and the oldest runs next.

    `rows`: how many rows each request decodes (`n`, from one prefill): they count against `max_rows` and
    the running budget; the prefill budget counts each prompt once.

    `rounds`: each request's fair-sharing round (fairness.py), in `lengths`' order, which is then the order
    of service rather than of age: a lower round goes before any higher one, and length similarity orders
    requests only within a round. The budgets apply as without it.
    """
    if not lengths or max_rows <= 0:
        return []
    weight = list(rows) if rows is not None else [1] * len(lengths)
    if weight[0] > max_rows:  # the oldest waits for room; nothing overtakes it
        return []
    rows_running, width_running = running

    def fits(rows: int, width: int) -> bool:
        total = (rows_running + rows) * max(width, width_running)
        return max_running_tokens is None or total <= max_running_tokens

    anchor = lengths[0]
    if rows_running and not fits(weight[0], anchor):
        return []
    round_of = list(rounds) if rounds is not None else [0] * len(lengths)
    order = sorted(range(1, len(lengths)), key=lambda i: (round_of[i], abs(lengths[i] - anchor), i))
    chosen = [0]
    longest, taken = anchor, weight[0]
    for i in order:
        if taken + weight[i] > max_rows:
            continue
        width = max(longest, lengths[i])
        if width * (len(chosen) + 1) > max_tokens or not fits(taken + weight[i], width):
            continue
        chosen.append(i)
        longest, taken = width, taken + weight[i]
    return sorted(chosen)
