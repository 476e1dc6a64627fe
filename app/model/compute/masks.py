"""Grammar masks of a batch's constrained rows: filled together by llguidance, applied only where they matter.

Filling: llguidance's parallel executor writes the packed bitmasks (int32, 32 tokens a word) of all
constrained rows at once, optionally while the model's forward pass runs (`MaskFiller.prefetch`).

Applying, on a CPU model: a greedy row does not need its mask over the whole vocabulary. Its plain argmax
is computed anyway (the same pass an unconstrained greedy row takes); when the grammar allows that token
(one bit of the packed mask), it IS the masked argmax: the same maximum, and no earlier index holds it, or
the plain argmax would be that index. Only rows whose argmax the grammar refuses take the masked argmax
(`refused_argmax`), on their rows alone, by numpy where the logits are on the host (a dense row knocks
out its refused maxima one by one: inside a string the next maximum is almost always allowed). This drops
the `torch.where` over the batch's logits and the mask's unpacking from almost every step
(docs/PERF.md#model-grammar-masks).
Sampled rows need the whole masked distribution and keep the full path (`apply`). On a GPU every row
keeps the full path: the masks travel packed, unpack there by a table lookup, and the `where` costs
microseconds with no wait for the host.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.model.compute.row import Row, take_rows
from app.model.compute.transfer import upload


@dataclass
class _Masks:
    """Packed bitmasks (int32, 32 tokens a word) of some constrained rows, each as of a number of tokens."""

    rows: dict[int, tuple[int, int]]
    """id(row) -> (its index in `bits`, len(row.generated) when filled): a stale mask is never used."""
    bits: torch.Tensor


class MaskFiller:
    """Owns llguidance's parallel executor and the thread that fills masks during the forward pass."""

    def __init__(self, threads: int | None = None) -> None:
        self._threads = threads
        self._executor: Any = None
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="voxtral-masks")
        self.pending: concurrent.futures.Future[_Masks] | None = None

    def prefetch(self, rows: Sequence[Row]) -> None:
        """Start filling the masks of these rows' next tokens. A failure here is left for `bits` to meet again."""
        try:
            constrained = [r for r in rows if matcher(r) is not None]
        except Exception:
            constrained = []
        self.pending = self._pool.submit(self._fill, constrained) if constrained else None

    def bits(self, rows: list[Row]) -> torch.Tensor:
        """Masks of `rows` in order: from the prefetch where it is still current, the rest filled now."""
        pending, self.pending = self.pending, None
        ready = pending.result() if pending is not None else None
        missing = [r for r in rows if not _current(ready, r)]
        fresh = self._fill(missing) if missing else None
        if fresh is not None and len(missing) == len(rows):
            return fresh.bits
        if fresh is None and ready is not None and [ready.rows[id(r)][0] for r in rows] == list(range(len(ready.bits))):
            return ready.bits  # the usual step: every row prefetched, in order; no copy
        picked = []
        for row in rows:
            source = fresh if fresh is not None and id(row) in fresh.rows else ready
            assert source is not None
            picked.append(source.bits[source.rows[id(row)][0]])
        return torch.stack(picked)

    def _fill(self, rows: list[Row]) -> _Masks:
        assert rows[0].constraint is not None
        words = (int(rows[0].constraint.vocab_size) + 31) // 32  # one tokenizer serves every row
        bits = torch.from_numpy(np.full((len(rows), words), -1, dtype=np.int32))  # torch.full costs more here
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing that module: it compiles a
        # kernel with torch.compile at import, which pulled in torch._dynamo on the first constrained row.
        matchers = [(matcher(r), j) for j, r in enumerate(rows)]
        self._llexecutor().unsafe_compute_mask_ptr(matchers, bits.data_ptr(), words * 4, len(rows))
        return _Masks({id(r): (j, len(r.generated)) for j, r in enumerate(rows)}, bits)

    def _llexecutor(self) -> Any:
        with self._lock:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor(self._threads)
            return self._executor


def matcher(row: Row) -> Any:
    return row.constraint.matcher if row.constraint is not None else None


def _current(masks: _Masks | None, row: Row) -> bool:
    return masks is not None and masks.rows.get(id(row), (0, -1))[1] == len(row.generated)


# -- applying ----------------------------------------------------------------------------------------
def apply(scores: torch.Tensor, bits: torch.Tensor, index: list[int]) -> torch.Tensor:
    """`scores` with the tokens that rows `index` refuse (their masks: `bits`, in that order) at -inf, in
    a new tensor (the caller's logits stay as they were)."""
    if not index:
        return scores
    allowed = unpack(bits, scores.shape[1], scores.device)
    masked = torch.where(allowed, take_rows(scores, index), float("-inf"))
    if len(index) == scores.shape[0]:
        return masked
    return scores.index_put((upload(index, scores.device, torch.long),), masked)


def allows(words: np.ndarray, token: int) -> bool:
    """Whether one row's packed mask (int32 words, little-endian bits) allows `token`."""
    return token >> 5 < len(words) and bool((int(words[token >> 5]) >> (token & 31)) & 1)


def greedy_masked(scores: torch.Tensor, bits: torch.Tensor, index: list[int], plain: list[int]) -> list[int]:
    """The masked argmax of rows `index` of `scores` (their masks: `bits`, in that order), given their plain
    argmax `plain`: it stands where the mask allows it; the rows that refuse it take `refused_argmax`."""
    words = bits.numpy()
    out = list(plain)
    refused = [j for j, token in enumerate(plain) if not allows(words[j], token)]
    if refused:
        chosen = refused_argmax(scores, bits[refused], [index[j] for j in refused])
        for j, token in zip(refused, chosen, strict=True):
            out[j] = token
    return out


def refused_argmax(scores: torch.Tensor, bits: torch.Tensor, index: list[int]) -> list[int]:
    """The masked argmax of rows `index` of `scores` (their masks: `bits`, in that order). A row that allows
    few tokens takes the argmax of their gathered scores, in ascending id order, so the first maximum is the
    full path's; a row that allows most (inside a string) knocks out its refused maxima (`_knock_out`); the
    rest, the same `where` and `argmax` as the full path, on their rows only."""
    words = bits.numpy()
    host = _host(scores)
    out: list[int] = []
    dense: list[int] = []
    for j, i in enumerate(index):
        ids = few_ids(words[j], scores.shape[1])
        token = _dense_argmax(host[i], words[j]) if ids is None and host is not None else None
        if ids is not None:
            values = host[i, ids] if host is not None else scores[i, torch.from_numpy(ids)].numpy()
            best = int(values.argmax())
            token = int(ids[best]) if values[best] != float("-inf") else None  # -inf everywhere: index 0
        if token is None:
            dense.append(j)
        out.append(-1 if token is None else token)
    if dense:
        allowed = unpack(bits[dense], scores.shape[1], scores.device)
        masked = torch.where(allowed, take_rows(scores, [index[j] for j in dense]), float("-inf"))
        for j, token in zip(dense, masked.argmax(-1).tolist(), strict=True):
            out[j] = int(token)
    return out


KNOCKS = 8
"""Refused maxima a dense row knocks out before it takes the full `where` instead."""


def _knock_out(row: np.ndarray, words: np.ndarray) -> int | None:
    """The masked argmax of one row, found by setting its refused maxima to -inf (on a copy) until the
    maximum is allowed: a few numpy argmaxes cost far less than the `where` and torch's argmax
    (docs/PERF.md#model-grammar-masks). Exact: the argmax over a superset of the allowed ids that lands on an allowed id
    is their maximum, and an allowed id holding it earlier would have been found first. None past `KNOCKS`
    refused maxima, or when only -inf is left (the full path then answers 0, as it does)."""
    values = row.copy()
    for _ in range(KNOCKS):
        token = int(values.argmax())
        if values[token] == -np.inf:
            return None
        if allows(words, token):
            return token
        values[token] = -np.inf
    return None


def _dense_argmax(row: np.ndarray, words: np.ndarray) -> int | None:
    """One row's masked argmax by numpy: knocking out its refused maxima, else the `where` over the row
    (cheaper than torch's); None where only -inf is allowed (the full path's case)."""
    token = _knock_out(row, words)
    if token is not None:
        return token
    allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: len(row)].view(np.bool_)
    if len(allowed) < len(row):
        return None
    token = int(np.where(allowed, row, -np.inf).argmax())
    return token if allowed[token] else None


def host_argmax(scores: torch.Tensor, index: list[int]) -> torch.Tensor | None:
    """The argmax of rows `index` of a CPU model's scores, by numpy (first maximum, NaN first, as torch):
    a fraction of torch's CPU argmax (docs/PERF.md#model-grammar-masks). None where numpy cannot read them."""
    host = _host(scores)
    if host is None:
        return None
    return torch.from_numpy(np.array([host[i].argmax() for i in index], dtype=np.int64))


def _host(scores: torch.Tensor) -> np.ndarray | None:
    """The scores as a numpy view, on a CPU model in a dtype numpy has (not bfloat16)."""
    if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64, torch.float16):
        return None
    return scores.detach().numpy()


FEW_WORDS = 64
"""A mask with at most this many nonzero words (2,048 ids) is read as a list of ids."""


def few_ids(words: np.ndarray, vocab: int) -> np.ndarray | None:
    """The ids one packed mask allows, ascending, when they are few (and at least one); else None."""
    where = np.flatnonzero(words)
    if not 0 < len(where) <= FEW_WORDS:
        return None
    bits = np.unpackbits(words[where].view(np.uint8), bitorder="little").reshape(-1, 32).astype(bool)
    ids: np.ndarray = ((where * 32)[:, None] + np.arange(32))[bits]
    ids = ids[ids < vocab]
    return ids if len(ids) else None


_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()
"""The 8 bits of every byte value, lowest first: on a GPU, unpacking is one gather from this table."""
_BYTE_BITS_ON: dict[torch.device, torch.Tensor] = {}
"""`_BYTE_BITS` on each device it was needed on: uploaded once, not at every step."""


def _byte_bits(device: torch.device) -> torch.Tensor:
    table = _BYTE_BITS_ON.get(device)
    if table is None:
        table = _BYTE_BITS_ON[device] = _BYTE_BITS.to(device)
    return table


def unpack(bits: torch.Tensor, vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """(rows, words) int32 bitmask on the host, bit j of word w for token 32w + j, -> (rows, vocab) bool on
    `device`; ids past the mask's end are not allowed. Little-endian, as llguidance writes it. For a CPU
    model numpy's unpackbits does it (far cheaper than torch ops: docs/PERF.md#model-grammar-masks); for a GPU
    the packed words travel (8x fewer bytes) and a table lookup unpacks them there."""
    device = device or bits.device
    if device.type == "cpu":
        ones = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")  # 0 or 1 per byte
        flat = torch.from_numpy(ones).view(torch.bool)  # a view, not a 4 MB conversion
    else:
        flat = unpack_by_table(upload(bits, device))
    if flat.shape[1] >= vocab:
        return flat[:, :vocab]
    return torch.nn.functional.pad(flat, (0, vocab - flat.shape[1]), value=False)


def unpack_by_table(bits: torch.Tensor) -> torch.Tensor:
    """The device path of `unpack`, where `bits` already is (tests run it on the CPU against numpy's)."""
    packed = bits.contiguous().view(torch.uint8).long()
    return _byte_bits(bits.device)[packed].view(bits.shape[0], -1)
