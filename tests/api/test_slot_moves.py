"""Moving rows between slots changes no row's output: the real `BatchGenerator` on the tiny model, greedy,
against each row decoded alone, wherever the row is clear of a near-tie (as tests/api/test_parity.py).

Each flight below makes the generator move or reuse slots in one way the engine does: rows leaving from the
middle (compaction copies rows of high slots into low ones), rows joining into freed slots, `select` with a
repeated index (the `n` fan-out copies a row's history mid-decode), a step padded past its rows (padding
rows write the scratch slot), rows crossing from width 128 to the next mid-decode, and a short row taking the
slot a long row left (its stale history must stay masked). Every flight asserts the move really happened,
so a test cannot pass blind."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator, BatchState, Row, sample
from app.model.compute.loader import LoadedModel
from app.model.compute.slots import CachePlan, width_of
from app.model.text.prompts import Prompter
from app.types import SamplingParams
from tests.support.audio_fixtures import JFK

TIE_TOL = 1e-3
"""A float32 top-2 logit gap within which a batch may pick another token than a lone row (as in
tests/api/test_parity.py, where the figure is argued)."""


def _generator(loaded: LoadedModel, log_mel: LogMel, slots: int, max_len: int = 1024) -> BatchGenerator:
    """Without prefix caching: the flights below name the slots rows land in (lowest free first); with it,
    a row that reuses nothing still lands below the step's padded size, but which free slot it takes there
    is the cache's eviction order (empty first, then least recently used: tests/api/test_prefix_cache.py
    moves rows that way), not the lowest."""
    plan = CachePlan(slots, max_len)
    return BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel, cache=plan, prefix_caching=False)


def _text(prompter: Prompter, words: int, word: str = "word") -> Any:
    """A chat prompt of 2 x `words` + 4 tokens."""
    return prompter.chat([{"role": "user", "content": f"{word} " * words}])


def _audio(prompter: Prompter, seconds: float) -> Any:
    """A chat prompt with `seconds` of speech: 375 audio tokens a 30 s window."""
    clip = np.resize(JFK, int(16000 * seconds)).astype(np.float32)
    question = {"type": "text", "text": "What is it?"}
    return prompter.chat([{"role": "user", "content": [{"type": "input_audio", "audio": clip}, question]}])


def _row(request: Any, generated: list[int] | None = None) -> Row:
    return Row(request.input_ids, request.audios, SamplingParams(), generated=list(generated or []))


def _alone(gen: BatchGenerator, request: Any, steps: int) -> tuple[list[int], float]:
    """Greedy ids of `request` decoded alone, and its smallest top-2 logit gap on the way."""
    row = _row(request)
    state, logits = gen.prefill([row])
    margin = float("inf")
    while True:
        top2 = logits[0].topk(2).values
        margin = min(margin, float(top2[0] - top2[1]))
        token = sample(logits, state.rows)[0]
        assert isinstance(token, int)
        row.generated.append(token)
        if len(row.generated) == steps:
            return row.generated, margin
        logits = gen.step(state, [token])


def _tick(
    gen: BatchGenerator, state: BatchState, logits: torch.Tensor, steps: dict[Row, int]
) -> tuple[BatchState, torch.Tensor]:
    """Sample a token for every row, let the rows that reached their `steps` leave, step the others."""
    tokens: list[int] = []
    for row, token in zip(state.rows, sample(logits, state.rows), strict=True):
        assert isinstance(token, int)  # not a row's sampling error
        row.generated.append(token)
        tokens.append(token)
    keep = [i for i, row in enumerate(state.rows) if len(row.generated) < steps[row]]
    state = gen.select(state, keep)
    if not state.rows:
        return state, logits[:0]
    return state, gen.step(state, [tokens[i] for i in keep])


def _join(
    gen: BatchGenerator, state: BatchState, logits: torch.Tensor, rows: list[Row]
) -> tuple[BatchState, torch.Tensor]:
    new, new_logits = gen.prefill(rows)
    return gen.merge(state, new), torch.cat([logits, new_logits])


def _assert_as_alone(gen: BatchGenerator, pairs: list[tuple[Row, Any]], steps: dict[Row, int]) -> None:
    """Every row's greedy ids equal its request's alone, wherever the lone run is clear of a near-tie; most
    rows must be (else the test is blind), and the outputs must differ between prompts."""
    runs: dict[tuple[int, int], tuple[list[int], float]] = {}  # a copy's request is its source's: run once
    for row, request in pairs:
        if (id(request), steps[row]) not in runs:
            runs[id(request), steps[row]] = _alone(gen, request, steps[row])
    alone = [runs[id(request), steps[row]] for row, request in pairs]
    decided = [i for i, (_, margin) in enumerate(alone) if margin > TIE_TOL]
    assert len(decided) >= 3 * len(pairs) // 4, f"only {len(decided)} of {len(pairs)} rows clear of ties"
    assert [pairs[i][0].generated for i in decided] == [alone[i][0] for i in decided]
    assert len({tuple(ids) for ids, _ in alone}) > 1


def test_compaction_joins_padding_and_a_width_boundary_keep_every_rows_output(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """Six rows in slots 0-5; the middle three leave, so the next step moves the rows of slots 4 and 5 into 1
    and 2 (4 rows, not 8); two rows join into slots 3 and 4, and the 5 rows step padded to 8 (3 padding rows
    on the scratch slot); rows of 116-124 prompt tokens cross from width 128 to the next while all this runs."""
    gen = _generator(loaded, log_mel, slots=8)
    words = ["word", "cat", "dog", "sun", "tree", "sky", "red", "blue"]
    requests = [_text(prompter, n, w) for n, w in zip([60, 20, 58, 9, 56, 30, 57, 14], words, strict=True)]
    rows = [_row(r) for r in requests]
    steps = {row: 14 for row in rows} | {rows[1]: 3, rows[2]: 3, rows[3]: 3}
    state, logits = gen.prefill(rows[:6])
    assert state.slots == [0, 1, 2, 3, 4, 5]
    for _ in range(3):
        state, logits = _tick(gen, state, logits, steps)
    assert state.slots == [0, 1, 2] and state.rows == [rows[0], rows[4], rows[5]]  # compacted by the 3rd step
    assert (4, 128) in gen.graphs.seen and gen.graphs.seen <= {(8, 128), (4, 128)}
    state, logits = _join(gen, state, logits, rows[6:])
    assert state.slots == [0, 1, 2, 3, 4]
    while state.rows:
        state, logits = _tick(gen, state, logits, steps)
    assert {(8, 128), (8, width_of(129, 1024)), (4, 128)} <= gen.graphs.seen  # the next width
    assert all(len(row.generated) == steps[row] for row in rows)
    _assert_as_alone(gen, list(zip(rows, requests, strict=True)), steps)


def test_fan_out_copies_a_rows_history_mid_decode(loaded: LoadedModel, prompter: Prompter, log_mel: LogMel) -> None:
    """`select` with repeated indices after four tokens (the `n` fan-out, here mid-decode): each copy goes
    on from its source's history in a fresh slot, as the source decoded alone would; then the original
    rows leave and the copies in high slots are compacted into the low ones."""
    gen = _generator(loaded, log_mel, slots=8)
    requests = [_text(prompter, 12, "one"), _audio(prompter, 4.0), _text(prompter, 40, "three")]
    rows = [_row(r) for r in requests]
    steps = dict.fromkeys(rows, 12)
    state, logits = gen.prefill(rows)
    for _ in range(4):
        state, logits = _tick(gen, state, logits, steps)
    keep = [0, 1, 1, 1, 2, 0]
    state = gen.select(state, keep)
    logits = logits[keep]
    assert state.slots == [0, 1, 3, 4, 2, 5]  # the copies in the lowest free slots
    copies = {j: _row(requests[i], rows[i].generated) for j, i in enumerate(keep) if j in (2, 3, 5)}
    state.rows = [copies.get(j, state.rows[j]) for j in range(len(keep))]
    steps |= dict.fromkeys(copies.values(), 12) | {rows[0]: 7, rows[1]: 7}
    for _ in range(3):
        state, logits = _tick(gen, state, logits, steps)
    assert state.rows == [copies[2], copies[3], rows[2], copies[5]]
    assert state.slots == [3, 0, 2, 1]  # the copies in slots 4 and 5 moved into the 2 freed
    while state.rows:
        state, logits = _tick(gen, state, logits, steps)
    pairs = list(zip(rows, requests, strict=True)) + [(copy, requests[keep[j]]) for j, copy in copies.items()]
    _assert_as_alone(gen, pairs, steps)


def test_a_short_row_in_the_slot_a_long_row_left_sees_none_of_its_history(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """A 45 s audio row (750 positions) leaves slot 1; a short row prefilled next takes that slot while an
    11 s audio row (381 positions) keeps the step 384-512 wide, so the step reads the long row's stale keys
    past the short row's length: masked, they change nothing. Compaction then moves the audio row, and later
    the short row, into slot 0 over the stale history of the rows that left it, as safely."""
    gen = _generator(loaded, log_mel, slots=3)
    requests = [_text(prompter, 10, "sun"), _audio(prompter, 45), _text(prompter, 8, "moon"), _audio(prompter, 11)]
    rows = [_row(r) for r in requests]
    steps = {rows[0]: 5, rows[1]: 3, rows[2]: 12, rows[3]: 6}
    state, logits = gen.prefill(rows[:2])
    assert len(requests[1].input_ids) > 700 and state.slots == [0, 1]
    for _ in range(3):
        state, logits = _tick(gen, state, logits, steps)
    assert state.rows == [rows[0]] and state.slots == [0]
    state, logits = _join(gen, state, logits, rows[2:])
    assert state.slots == [0, 1, 2]  # the short row in the long row's slot
    for _ in range(2):
        state, logits = _tick(gen, state, logits, steps)
    assert (3, width_of(len(requests[3].input_ids) + 1, 1024)) in gen.graphs.seen  # the short row read >= 384
    assert state.rows == [rows[2], rows[3]] and state.slots == [1, 0]  # the audio row over the first's history
    for _ in range(4):
        state, logits = _tick(gen, state, logits, steps)
    assert state.rows == [rows[2]] and state.slots == [0]  # the short row over the audio row's history
    while state.rows:
        state, logits = _tick(gen, state, logits, steps)
    _assert_as_alone(gen, list(zip(rows, requests, strict=True)), steps)


def test_no_more_rows_than_slots_and_freed_slots_are_reused(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    gen = _generator(loaded, log_mel, slots=2, max_len=256)
    requests = [_text(prompter, n) for n in (3, 5, 7)]
    state, _ = gen.prefill([_row(r) for r in requests[:2]])
    with pytest.raises(RuntimeError, match=r"no free KV cache slot for 1 rows \(2 slots\)"):
        gen.prefill([_row(requests[2])])
    with pytest.raises(RuntimeError, match="no free KV cache slot"):
        gen.select(state, [0, 0, 1])  # a fan-out needs a third slot too
    state, _ = gen.prefill([_row(r) for r in requests[:2]])
    kept = gen.select(state, [1])
    assert kept.slots == [1]
    joined, _ = gen.prefill([_row(requests[2])])
    assert joined.slots == [0]  # the slot the row not kept left
    del kept, joined  # states dropped unspent free their slots
    cycle: list[Any] = []
    cycle.append(gen.prefill([_row(r) for r in requests[:2]])[0])
    cycle.append(cycle)  # a state held only by garbage in a reference cycle (as an exception's traceback holds one)
    del cycle
    state, _ = gen.prefill([_row(r) for r in requests[1:]])
    assert state.slots == [0, 1]
    with pytest.raises(ValueError, match="does not fit 256"):
        gen.prefill([_row(_text(prompter, 130))])
