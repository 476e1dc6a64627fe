"""Prefix caching changes no answer (issue 27, point 3): greedy tokens and log-probs with it on equal those with
it off, on the real tiny model in float32, for every way a prefix is found; and a prefix is never served to a
prompt that differs in one token or one audio sample.

Each case decodes the same rows through two generators over the same model, one with `prefix_caching` and one
without, and asserts the cache really served tokens (`Row.cached_tokens`), so no case passes blind. Rows leave
through `select(state, [])`, as the engine's worker retires them, so their slots cache prompt and output.

Tolerance: a hit attends over keys computed by another forward pass (another batch shape, or the decode step
for generated tokens: fused projections, other GEMM blocking), so logits move within float32 rounding as in
tests/api/test_parity.py. Log-probs are held to `LOGPROB_TOL`; tokens to equality on steps clear of near-ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator, BatchState, Row, sample
from app.model.compute.loader import LoadedModel
from app.model.compute.prefix import BLOCK
from app.model.compute.slots import CachePlan, SlotCache
from app.model.text.prompts import Prompter
from app.types import SamplingParams
from tests.support.audio_fixtures import JFK

TIE_TOL = 1e-3
"""A float32 top-2 logit gap within which another forward pass may pick the other token (as in
tests/api/test_parity.py, where the figure is argued)."""
LOGPROB_TOL = 1e-3
"""Log-probs of the same token with the cache on and off: the largest gap seen here is ~1e-5 (keys of a
prefill reused by a prefill) to ~1e-4 (keys the decode step wrote, reused by a prefill); as the lean step's
logits against transformers' (`F32_LOGIT_TOL` of tests/api/test_parity.py)."""
STEPS = 8


@dataclass
class Decoded:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    margin: float = float("inf")
    """The smallest top-2 logit gap on the way: below `TIE_TOL`, the row's tokens are the CPU's call."""


def _pair(model: Any, log_mel: LogMel, slots: int = 4, max_len: int = 1024) -> tuple[BatchGenerator, BatchGenerator]:
    plan = CachePlan(slots, max_len)
    on = BatchGenerator(model, pad_token_id=11, log_mel=log_mel, cache=plan)
    off = BatchGenerator(model, pad_token_id=11, log_mel=log_mel, cache=plan, prefix_caching=False)
    return on, off


def _row(ids: list[int], audios: list[np.ndarray], salt: str | None = None) -> Row:
    return Row(list(ids), list(audios), SamplingParams(), cache_salt=salt)


def _start(gen: BatchGenerator, rows: list[Row]) -> tuple[BatchState, torch.Tensor, list[Decoded]]:
    state, logits = gen.prefill(rows)
    return state, logits, [Decoded() for _ in rows]


def _advance(gen: BatchGenerator, state: BatchState, logits: torch.Tensor, out: list[Decoded], last: bool) -> Any:
    """Sample one greedy token a row (recording its log-prob and margin); step unless `last`."""
    logprobs = logits.log_softmax(-1)
    top2 = logits.topk(2, dim=-1).values
    tokens = sample(logits, state.rows)
    for i, (row, token) in enumerate(zip(state.rows, tokens, strict=True)):
        assert isinstance(token, int)
        row.generated.append(token)
        out[i].tokens.append(token)
        out[i].logprobs.append(float(logprobs[i, token]))
        out[i].margin = min(out[i].margin, float(top2[i, 0] - top2[i, 1]))
    return None if last else gen.step(state, tokens)


def _decode(gen: BatchGenerator, rows: list[Row], steps: int = STEPS) -> list[Decoded]:
    """Greedy decode of `rows` together, then they leave (their slots keep what they hold)."""
    state, logits, out = _start(gen, rows)
    for k in range(steps):
        logits = _advance(gen, state, logits, out, last=k == steps - 1)
    gen.select(state, [])
    return out


def _assert_same(on: list[Decoded], off: list[Decoded]) -> None:
    """Tokens equal wherever the uncached run is clear of a near-tie; log-probs within `LOGPROB_TOL` over
    the tokens both runs share."""
    decided = [i for i, d in enumerate(off) if d.margin > TIE_TOL]
    assert len(decided) >= max(1, 3 * len(off) // 4), f"only {len(decided)} of {len(off)} rows clear of ties"
    assert [on[i].tokens for i in decided] == [off[i].tokens for i in decided]
    for a, b in zip(on, off, strict=True):
        shared = next((k for k, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=True)) if x != y), len(a.tokens))
        pairs = zip(a.logprobs[: shared + 1], b.logprobs[: shared + 1], strict=True)
        gap = max((abs(x - y) for x, y in pairs), default=0.0)
        assert gap <= LOGPROB_TOL, gap


def _chat(prompter: Prompter, text: str, audio: np.ndarray | None = None) -> Any:
    content: Any = text if audio is None else [{"type": "input_audio", "audio": audio}, {"type": "text", "text": text}]
    return prompter.chat([{"role": "user", "content": content}])


def _clip(seconds: float, scale: float = 1.0) -> np.ndarray:
    return (np.resize(JFK, int(16000 * seconds)) * scale).astype(np.float32)


def _first_audio(ids: list[int], gen: BatchGenerator) -> int:
    return ids.index(gen.audio_token_id)


def _both(on: BatchGenerator, off: BatchGenerator, ids: list[int], audios: list[np.ndarray]) -> tuple[Row, Decoded]:
    """Decode one prompt with the cache and without; assert they agree; the cached row and its output."""
    row = _row(ids, audios)
    got = _decode(on, [row])
    _assert_same(got, _decode(off, [_row(ids, audios)]))
    return row, got[0]


def test_a_whole_prompt_and_a_prefix_ending_mid_block_hit_with_the_same_answers(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    on, off = _pair(loaded.model, log_mel)
    prompts = [_chat(prompter, "word " * 40), _chat(prompter, "What is said? " * 4, _clip(3.0))]
    for prompt in prompts:
        first, _ = _both(on, off, prompt.input_ids, prompt.audios)
        assert first.cached_tokens == 0
        again, _ = _both(on, off, prompt.input_ids, prompt.audios)  # the whole prompt: all but its last token
        assert again.cached_tokens == (len(prompt.input_ids) - 1) // BLOCK * BLOCK > 0  # whole blocks, as vLLM
        cut = len(prompt.input_ids) - 7  # the same first `cut` tokens (a block boundary inside), then others
        cut -= 0 if cut % BLOCK else 1
        other = [*prompt.input_ids[:cut], 40, 41, 42, 43, 44]
        row, _ = _both(on, off, other, prompt.audios)
        assert row.cached_tokens == cut // BLOCK * BLOCK
    stats = on.prefix_stats()
    assert stats.hits > 0 and stats.queries > stats.hits and 0 < stats.cached_slots <= 4 and stats.cached_bytes > 0


def test_a_prompt_that_diverges_mid_audio_reuses_only_what_comes_before_the_audio(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """The same first samples, one different later: the audio's key differs, so none of its tokens match
    (its encoder output depends on all of it); the text before it does. The same audio with another
    question after it reuses the audio's blocks."""
    on, off = _pair(loaded.model, log_mel)
    clip = _clip(6.0)
    base = _around(prompter, clip, "What is it?")
    _both(on, off, base.input_ids, base.audios)
    audio_at = _first_audio(base.input_ids, on)
    changed = clip.copy()
    changed[16000 * 4] += 0.25  # one sample, 4 s in
    other = _around(prompter, changed, "What is it?")
    assert other.input_ids == base.input_ids  # the same tokens: only the audio's content tells them apart
    row, _ = _both(on, off, other.input_ids, other.audios)
    assert row.cached_tokens == audio_at // BLOCK * BLOCK > 0
    again = _around(prompter, clip, "Who says it, and to whom?")
    row, _ = _both(on, off, again.input_ids, again.audios)
    assert row.cached_tokens >= (audio_at + 375) // BLOCK * BLOCK  # through the whole audio


def _around(prompter: Prompter, clip: np.ndarray, question: str) -> Any:
    """A chat prompt: some text, the audio, `question`."""
    parts = [{"type": "text", "text": "Listen to this " * 10}, {"type": "input_audio", "audio": clip}]
    return prompter.chat([{"role": "user", "content": [*parts, {"type": "text", "text": question}]}])


def test_a_follow_up_turn_hits_the_previous_answer(loaded: LoadedModel, prompter: Prompter, log_mel: LogMel) -> None:
    on, off = _pair(loaded.model, log_mel)
    first = _chat(prompter, "What did he say?", _clip(4.0))
    ids = list(first.input_ids)
    previous = 0
    for turn in range(3):
        row, out = _both(on, off, ids, first.audios)
        if turn:  # the cache holds the previous prompt and all but the last token of its answer
            assert row.cached_tokens == (previous - 1) // BLOCK * BLOCK
        previous = len(ids) + len(out.tokens)
        ids = ids + out.tokens + [5, 6, 7, 8, 9 + turn]  # the answer, then the next question's tokens


def test_a_prefix_held_by_a_running_row_is_copied_and_eviction_keeps_the_answers(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """A row still decoding holds the prefix: the new row gets a copy in its own slot (the source keeps
    decoding as before). Then more distinct prompts than slots: the first are evicted (misses, same answers)."""
    on, off = _pair(loaded.model, log_mel, slots=3)
    prompt = _chat(prompter, "sun " * 50)
    _decode(on, [_row(prompt.input_ids, [])], steps=2)  # cached in a free slot
    runner = _row(prompt.input_ids, [])
    state, logits, out = _start(on, [runner])
    assert runner.cached_tokens > 0  # took the free slot as it was
    for _ in range(3):
        logits = _advance(on, state, logits, out, last=False)
    sharer = _row([*prompt.input_ids, 40, 41], [])
    shared, shared_logits, shared_out = _start(on, [sharer])
    assert sharer.cached_tokens == len(prompt.input_ids) // BLOCK * BLOCK > 0  # the running row's prompt
    assert shared.slots != state.slots
    both = on.merge(state, shared)
    logits = torch.cat([logits, shared_logits])
    for k in range(STEPS):
        logits = _advance(on, both, logits, out + shared_out, last=k == STEPS - 1)
    on.select(both, [])
    reference = _decode(off, [_row(prompt.input_ids, [])], STEPS + 3)
    reference += _decode(off, [_row([*prompt.input_ids, 40, 41], [])])
    _assert_same([out[0], shared_out[0]], reference)

    prompts = [_chat(prompter, f"{word} " * (20 + 3 * i)) for i, word in enumerate(["a", "b", "c", "d", "e"])]
    for prompt in prompts:
        _both(on, off, prompt.input_ids, [])
    row, _ = _both(on, off, prompts[0].input_ids, [])  # three slots: the first two were evicted
    assert row.cached_tokens == 0
    row, _ = _both(on, off, prompts[-1].input_ids, [])
    assert row.cached_tokens > 0


def test_a_prefix_is_never_served_to_a_prompt_one_token_or_one_sample_away(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """Exactly the whole blocks before the changed token (or before the changed audio) are served, and the
    answers equal the uncached generator's."""
    on, off = _pair(loaded.model, log_mel)
    clip = _clip(3.0)
    base = _around(prompter, clip, "What is it? " * 3)
    _decode(on, [_row(base.input_ids, base.audios)], steps=2)
    audio_at = _first_audio(base.input_ids, on)
    for position in (1, 17, 33, audio_at - 1, len(base.input_ids) - 5, len(base.input_ids) - 2):
        ids = list(base.input_ids)
        assert ids[position] != on.audio_token_id
        ids[position] = 40 if ids[position] != 40 else 41
        row, _ = _both(on, off, ids, base.audios)
        assert row.cached_tokens == position // BLOCK * BLOCK, (position, row.cached_tokens)
        _decode(on, [_row(base.input_ids, base.audios)], steps=1)  # the original back in the cache
    for sample_at in (0, 1000, len(clip) - 1):
        changed = clip.copy()
        changed[sample_at] += 1e-3
        row, _ = _both(on, off, base.input_ids, [changed])
        assert row.cached_tokens == audio_at // BLOCK * BLOCK, (sample_at, row.cached_tokens)
    salted = _row(base.input_ids, base.audios, salt="tenant-a")
    _decode(on, [salted], steps=1)
    assert salted.cached_tokens == 0  # another tenant's cache, though the same prompt is cached unsalted
    again = _row(base.input_ids, base.audios, salt="tenant-a")
    _decode(on, [again], steps=1)
    assert again.cached_tokens > 0


def test_compaction_and_fan_out_keep_the_index_true(loaded: LoadedModel, prompter: Prompter, log_mel: LogMel) -> None:
    """Rows leave from the middle, so the next step moves high rows into low slots holding cached prefixes
    (swapped up, not lost); `select` copies a row (the `n` fan-out). Every prefix hit afterwards answers as
    the uncached generator does."""
    on, off = _pair(loaded.model, log_mel, slots=8)
    prompts = [_chat(prompter, f"{word} " * (12 + 5 * i)) for i, word in enumerate("abcdefgh")]
    _decode(on, [_row(p.input_ids, []) for p in prompts[:3]], steps=2)  # slots 0-2 cache a, b, c
    rows = [_row(p.input_ids, []) for p in prompts[3:8]]
    state, logits, out = _start(on, rows)
    assert sorted(state.slots) == [3, 4, 5, 6, 7]  # empty slots first
    logits = _advance(on, state, logits, out, last=False)
    state = on.select(state, [3, 4, 4])  # three rows leave, one is fanned out into a fresh slot
    logits = logits[[3, 4, 4]]
    kept = [out[3], out[4], Decoded(list(out[4].tokens), list(out[4].logprobs), out[4].margin)]
    state.rows[2] = _row(prompts[7].input_ids, [])
    state.rows[2].generated = list(state.rows[1].generated)
    for k in range(4):
        logits = _advance(on, state, logits, kept, last=k == 3)
    assert state.slots == [1, 2, 0]  # the copy in a's slot, the others compacted into b's and c's
    on.select(state, [])
    for prompt in prompts[1:]:  # b and c swapped up by the compaction, d-h where their rows left them
        row, _ = _both(on, off, prompt.input_ids, [])
        assert row.cached_tokens > 0
    row, _ = _both(on, off, prompts[0].input_ids, [])
    assert row.cached_tokens == 0  # a, least recently used, was overwritten by the fan-out's copy


def test_a_thousand_distinct_prompts_leave_the_index_bounded_by_the_slots(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    on, _ = _pair(loaded.model, log_mel, slots=4, max_len=256)
    assert on.prefix is not None
    base = _chat(prompter, "count " * 20).input_ids
    for batch in range(250):
        rows = [_row([*base[:2], 100 + batch, 200 + i, *base[2:]], []) for i in range(4)]
        state, _ = on.prefill(rows)
        on.select(state, [])
        assert on.prefix.entries() <= 4 * len(rows[0].input_ids) // BLOCK
    stats = on.prefix_stats()
    assert stats.cached_slots == 4 and stats.queries == 1000 * len(rows[0].input_ids)


def test_full_vocab_hits_answer_as_uncached(full_vocab: LoadedModel, log_mel: LogMel) -> None:
    """The 131,072-token vocabulary: a whole-prompt hit and a follow-up turn."""
    on, off = _pair(full_vocab.model, log_mel)
    ids = [1, 3, *range(1000, 1060), 4]
    _both(on, off, ids, [])
    row, out = _both(on, off, ids, [])
    assert row.cached_tokens == len(ids) // BLOCK * BLOCK
    follow = ids + out.tokens + [3, 500, 501, 4]
    row, _ = _both(on, off, follow, [])
    assert row.cached_tokens == (len(ids) + len(out.tokens) - 1) // BLOCK * BLOCK


def test_rows_with_different_cached_lengths_and_a_miss_prefilled_together_answer_as_uncached(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """One prefill: two rows over one cached prompt (different lengths after it), one over another cached
    prompt, one over part of it, and one that reuses nothing."""
    on, off = _pair(loaded.model, log_mel, slots=8)
    first, second = _chat(prompter, "alpha " * 40).input_ids, _chat(prompter, "beta " * 70).input_ids
    for ids in (first, second):
        _decode(on, [_row(ids, [])], steps=2)
    batch = [
        [*first, 40, 41, 42],
        _chat(prompter, "gamma " * 30).input_ids,
        [*second, *[50] * 21],
        [*first, *[60] * 13],
        [*second[:40], 70, 71],
    ]
    rows = [_row(ids, []) for ids in batch]
    got = _decode(on, rows)
    assert [r.cached_tokens for r in rows] == [
        len(first) // BLOCK * BLOCK,
        0,
        len(second) // BLOCK * BLOCK,
        len(first) // BLOCK * BLOCK,
        40 // BLOCK * BLOCK,
    ]
    _assert_same(got, _decode(off, [_row(ids, []) for ids in batch]))


def _two(prompter: Prompter, a: np.ndarray, b: np.ndarray, question: str = "Compare them.") -> Any:
    """A prompt with two audios, text before each (more than a block) and a question after."""
    content = [
        {"type": "text", "text": "First: " * 10},
        {"type": "input_audio", "audio": a},
        {"type": "text", "text": "Second: " * 10},
        {"type": "input_audio", "audio": b},
        {"type": "text", "text": question},
    ]
    return prompter.chat([{"role": "user", "content": content}])


def test_two_audios_the_same_audio_twice_and_a_hit_through_the_first_encodes_only_the_rest(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """Audios keyed by content, not position: A then B, A twice, B then A all tokenize the same and hit only
    what they share; a hit that covers the first audio's tokens does not encode it again (the encoder cache
    off, so every encoding shows as a query)."""
    plan = CachePlan(8, 1024)
    on = BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel, cache=plan, encoder_cache_bytes=0)
    off = BatchGenerator(loaded.model, 11, log_mel=log_mel, cache=plan, prefix_caching=False)
    a, b, c = _clip(3.0), _clip(4.0, 0.5), _clip(4.0, 0.25)
    ab, aa, ba = _two(prompter, a, b), _two(prompter, a, a), _two(prompter, b, a)
    assert ab.input_ids == aa.input_ids == ba.input_ids
    ids = ab.input_ids
    at = _first_audio(ids, on)
    second_at = next(i for i in range(at + 1, len(ids)) if ids[i] == on.audio_token_id and ids[i - 1] != ids[i])
    row, _ = _both(on, off, ids, ab.audios)
    assert row.cached_tokens == 0
    row, _ = _both(on, off, ids, aa.audios)  # the first audio and the text after it
    assert row.cached_tokens == second_at // BLOCK * BLOCK > at
    row, _ = _both(on, off, ids, ba.audios)  # another first audio: the text before it only
    assert row.cached_tokens == at // BLOCK * BLOCK
    row, _ = _both(on, off, ids, ab.audios)  # A A took A B's slot in place (less than twice what it reused)
    assert row.cached_tokens == second_at // BLOCK * BLOCK
    row, _ = _both(on, off, ids, ab.audios)
    assert row.cached_tokens == (len(ids) - 1) // BLOCK * BLOCK
    before = on.encoder_cache.stats().queries
    row, _ = _both(on, off, ids, _two(prompter, a, c).audios)  # A cached with the text after it: C alone
    assert row.cached_tokens == second_at // BLOCK * BLOCK
    assert on.encoder_cache.stats().queries - before == 1


def test_a_preempted_rows_recompute_answers_as_uncached_and_is_counted_apart(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """A row preempted after 20 tokens comes back with them as prompt: it hits its own cached history,
    answers as the uncached generator, keeps its first prefill's `cached_tokens`, and vLLM's stats count the
    recompute apart from the queries and hits."""
    on, off = _pair(loaded.model, log_mel)
    prompt = _chat(prompter, "alpha " * 40).input_ids
    first = _row(prompt, [])
    _decode(on, [first], steps=20)
    stats = on.prefix_stats()
    assert (stats.requests, stats.queries, stats.hits, stats.preempted_requests) == (1, len(prompt), 0, 0)
    again, reference = _row(prompt, []), _row(prompt, [])
    again.generated, reference.generated = list(first.generated), list(first.generated)
    _assert_same(_decode(on, [again]), _decode(off, [reference]))
    assert again.cached_tokens == 0  # its first prefill's
    stats = on.prefix_stats()
    length = len(prompt) + len(first.generated)
    assert (stats.requests, stats.queries, stats.hits) == (1, len(prompt), 0)
    assert (stats.preempted_requests, stats.preempted_queries) == (1, length)
    assert stats.preempted_hits == (length - 1) // BLOCK * BLOCK > 0


class _FailingCopy(SlotCache):
    """A slot cache whose next copy writes its first layer, then fails as a device out of memory would in
    the next layer's gather (the real `SlotCache.copy` works layer by layer)."""

    fail = False

    def copy(self, sources: Sequence[int], targets: Sequence[int], length: int) -> None:
        if not self.fail:
            return super().copy(sources, targets, length)
        self.fail = False
        index = torch.tensor([list(sources), list(targets)])
        for buffer in (self.keys[0], self.values[0]):
            buffer[:, :, :length].index_copy_(0, index[1], buffer[:, :, :length].index_select(0, index[0]))
        raise torch.OutOfMemoryError("CUDA out of memory (the second layer's copy)")


def test_a_copy_failing_part_way_leaves_no_prefix_indexed_in_the_slots_it_wrote(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """The `n` fan-out copies a row into the slot caching a prefix; the copy fails after its first layer
    (fault injected in the cache, the model real): that slot must no longer serve the prefix."""
    on, off = _pair(loaded.model, log_mel, slots=2)
    failing = _FailingCopy.__new__(_FailingCopy)
    failing.__dict__.update(on.cache.__dict__)
    on.cache = failing
    cached = _chat(prompter, "alpha " * 40).input_ids
    _decode(on, [_row(cached, [])], steps=2)
    state, _ = on.prefill([_row(_chat(prompter, "zeta " * 60).input_ids, [])])
    assert on.prefix is not None and on.prefix.match(on._chain(_row(cached, []), cached) or [])[1] == {
        1 - state.slots[0]
    }
    failing.fail = True
    with pytest.raises(torch.OutOfMemoryError):
        on.select(state, [0, 0])  # the copy goes to the other slot, which caches `cached`
    del state
    assert on.prefix.match(on._chain(_row(cached, []), cached) or [])[0] == 0
    row, _ = _both(on, off, [*cached, 40, 41], [])
    assert row.cached_tokens == 0


def test_a_failed_prefill_keeps_the_prefix_of_a_slot_taken_in_place(
    loaded: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """A prefill fails (a row's audio tokens do not match its audio's embeddings) after another row took a
    cached slot in place: that slot's blocks below the row's cached length were not written, and still hit."""
    on, off = _pair(loaded.model, log_mel)
    cached = _chat(prompter, "alpha " * 40).input_ids
    _decode(on, [_row(cached, [])], steps=2)
    broken = _row([1, *[on.audio_token_id] * 3, 5, 6], [_clip(1.0)])
    with pytest.raises(ValueError, match="audio embeddings"):
        on.prefill([_row([*cached, 40, 41], []), broken])
    row, _ = _both(on, off, [*cached, 42], [])
    assert row.cached_tokens == len(cached) // BLOCK * BLOCK > 0
