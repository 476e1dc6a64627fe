"""Which waiting requests run together: the oldest first, then those of similar length.

Grouping by prompt length (audio tokens included) keeps left padding, and so wasted compute,
low; the oldest entry always goes in so nothing starves. Pure function: tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence


def select_batch(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[int]:
    """Indices (into `lengths`, oldest first) of the requests to prefill together.

    The padded cost of a group is rows x longest prompt; it must stay within `max_tokens`,
    except that the oldest request always goes, alone if it must.
    """
    if not lengths or max_rows <= 0:
        return []
    anchor = lengths[0]
    order = sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - anchor), i))
    chosen = [0]
    longest = anchor
    for i in order:
        if len(chosen) >= max_rows:
            break
        width = max(longest, lengths[i])
        if width * (len(chosen) + 1) > max_tokens:
            continue
        chosen.append(i)
        longest = width
    return sorted(chosen)
