"""Grammar masks applied sparsely on a CPU model choose exactly what the full masked argmax chooses, and the
closing walk's saved work (kept walks, bit reads, remembered longest tokens) changes none of its decisions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.model.compute.masks import few_ids, greedy_masked, host_argmax, unpack
from app.model.compute.row import Row
from app.model.compute.sampling import Sampler
from app.model.text.closing import Closer, ClosingPolicy, _allowed_ids
from app.model.text.constrained import Constrainer
from app.model.text.vocabulary import read_vocab
from app.model.values import FunctionSpec, OutputSpec, TokenVocab
from app.types import SamplingParams
from tests.support.tekken_vocab import vocab

TOOL = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
TOOL["required"] = ["city", "days"]
SPECS = {
    "json_object": OutputSpec(json_schema={"type": "object"}),
    "tool required": OutputSpec((FunctionSpec("get_weather", TOOL),), "required"),
}


def pack(allowed: np.ndarray) -> torch.Tensor:
    """(rows, vocab) bool -> int32 words, bit j of word w for token 32w + j (llguidance's layout)."""
    padded = np.zeros((allowed.shape[0], -(-allowed.shape[1] // 32) * 32), dtype=np.uint8)
    padded[:, : allowed.shape[1]] = allowed
    return torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").view(np.int32).copy())


def masks(rng: np.random.Generator, rows: int, vocab_size: int, plain: np.ndarray) -> np.ndarray:
    """Every kind a grammar makes: dense random, a few ids, one id, all but the argmax, all."""
    allowed = np.zeros((rows, vocab_size), dtype=bool)
    for i in range(rows):
        kind = i % 5
        if kind == 0:
            allowed[i] = rng.random(vocab_size) < 0.5
        elif kind == 1:
            allowed[i, rng.choice(vocab_size, size=int(rng.integers(1, 300)), replace=False)] = True
        elif kind == 2:
            allowed[i, int(rng.integers(vocab_size))] = True
        elif kind == 3:
            allowed[i] = True
            allowed[i, plain[i]] = False
        else:
            allowed[i] = True
    return allowed


@pytest.mark.parametrize("vocab_size", [1000, 131_072])
@pytest.mark.parametrize("ties", [False, True])
def test_the_sparse_greedy_path_is_the_full_masked_argmax(vocab_size: int, ties: bool) -> None:
    rng = np.random.default_rng(vocab_size + ties)
    refused = 0
    for _ in range(3):
        scores = torch.from_numpy(rng.standard_normal((20, vocab_size)).astype(np.float32) * 4)
        if ties:  # few values: the maximum is held by many ids, allowed and refused
            scores = scores.round().clamp(-2, 2)
        plain = scores.argmax(-1)
        allowed = masks(rng, 20, vocab_size, plain.numpy())
        bits = pack(allowed)
        expected = torch.where(unpack(bits, vocab_size), scores, float("-inf")).argmax(-1).tolist()
        index = list(range(20))
        assert greedy_masked(scores, bits, index, plain.tolist()) == expected
        refused += sum(not allowed[i, t] for i, t in enumerate(plain.tolist()))
    assert refused >= 6, "the cases must include argmax the mask refuses"


def test_the_host_argmax_is_torch_argmax() -> None:
    """numpy's argmax where torch's was: the first maximum, ties and rows of -inf included; and no answer
    for a dtype numpy lacks (the caller keeps torch's)."""
    rng = np.random.default_rng(11)
    scores = torch.from_numpy(rng.standard_normal((8, 131_072)).astype(np.float32)).round().clamp(-1, 1)
    scores[3] = float("-inf")
    scores[5, 1000:] = float("-inf")
    for dtype in (torch.float32, torch.float16, torch.float64):
        for index in ([0, 1, 2, 3, 4, 5, 6, 7], [5, 3, 0]):
            found = host_argmax(scores.to(dtype), index)
            assert found is not None and found.tolist() == scores.to(dtype)[index].argmax(-1).tolist()
    assert host_argmax(scores.to(torch.bfloat16), [0]) is None


def test_a_row_that_allows_only_minus_infinity_answers_as_the_full_path() -> None:
    scores = torch.zeros(2, 4096)
    scores[0, 100:] = float("-inf")  # allowed: 100 on, all -inf; refused: 0-99
    scores[1, :] = float("-inf")
    scores[1, 7] = 1.0
    allowed = np.ones((2, 4096), dtype=bool)
    allowed[0, :100] = False
    allowed[1, 7] = False
    bits = pack(allowed)
    expected = torch.where(unpack(bits, 4096), scores, float("-inf")).argmax(-1).tolist()
    assert expected == [0, 0]
    assert greedy_masked(scores, bits, [0, 1], scores.argmax(-1).tolist()) == expected


def test_rows_of_a_larger_batch_are_read_at_their_own_positions() -> None:
    rng = np.random.default_rng(7)
    scores = torch.from_numpy(rng.standard_normal((6, 500)).astype(np.float32))
    index = [4, 1]
    allowed = np.zeros((2, 500), dtype=bool)
    allowed[0, 17] = allowed[1, 400] = True
    plain = scores.argmax(-1)[index].tolist()
    assert greedy_masked(scores, pack(allowed), index, plain) == [17, 400]


def test_the_ids_of_a_mask_are_its_set_bits_in_order() -> None:
    rng = np.random.default_rng(3)
    for size in (64, 1000, 131_072):
        allowed = rng.random((1, size)) < 0.01  # at 131,072: too many for `few_ids`, which says so
        bits = pack(allowed)
        ids = few_ids(bits[0].numpy(), size)
        assert ids is None or np.array_equal(ids, np.flatnonzero(allowed[0]))
        assert np.array_equal(_allowed_ids(bits[0].numpy().tobytes(), size), np.flatnonzero(allowed[0]))
    assert few_ids(np.zeros(4, dtype=np.int32), 128) is None  # nothing allowed: the full path decides


# -- at the real vocabulary, through the sampler -----------------------------------------------------
def full_vocab_constrainer(model_dir: Path) -> Constrainer:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tekken = MistralTokenizer.from_file(str(model_dir / "tekken.json")).instruct_tokenizer.tokenizer
    return Constrainer(read_vocab(tekken))


@pytest.mark.parametrize("spec", list(SPECS))
def test_greedy_constrained_rows_take_their_masked_argmax_at_131k(full_vocab_dir: Path, spec: str) -> None:
    """Each step, every row's token is the argmax of its logits where its own grammar (`allowed()`, read
    apart from the sampler) allows: whether the plain argmax was allowed or not, ties included."""
    factory = full_vocab_constrainer(full_vocab_dir).factory(SPECS[spec])
    assert factory is not None
    rows = [Row([1], [], SamplingParams(max_new_tokens=4096), constraint=factory()) for _ in range(8)]
    sampler, generator, refused = Sampler(), torch.Generator().manual_seed(5), 0
    for step in range(12):
        logits = torch.randn(8, 131_072, generator=generator) * 4
        if step % 3 == 2:
            logits = logits.round().clamp(-3, 3)  # ties at the maximum
        allowed = [r.constraint.allowed() for r in rows]  # type: ignore[union-attr]
        expected = [int(torch.where(a, x, float("-inf")).argmax()) for a, x in zip(allowed, logits, strict=True)]
        refused += sum(not a[int(t)] for a, t in zip(allowed, logits.argmax(-1), strict=True))
        if step % 2:
            sampler.prefetch(rows)
        assert sampler.sample(logits, rows) == expected
        for row, token in zip(rows, expected, strict=True):
            row.generated.append(token)
    assert refused > 0


# -- the closing walk --------------------------------------------------------------------------------
class WalkEveryTime:
    """The closing rule as first written: a fresh walk at every measure, no kept walk."""

    def __init__(self, policy: ClosingPolicy) -> None:
        self.policy, self.unmeasured = policy, 0
        self.last: int | None = None

    def settle(self, matcher: Any, token: int, remaining: int) -> int:
        self.unmeasured += 1
        if self.last is not None and remaining > 2 * self.last + 16 and self.unmeasured < 16:
            return token
        self.unmeasured = 0
        after = self.policy.after(matcher, token, remaining)
        steps = sum(len(s) for s in after) if after is not None else None
        if steps is not None and steps <= remaining:
            self.last = steps
            return token
        closing = self.policy.next(matcher)
        self.last = self.policy.distance(matcher)
        return closing if closing is not None else token


class CountedWalks(ClosingPolicy):
    """The same policy, counting its walks (the work a kept path saves)."""

    walks = 0

    def walk(self, walk: Any, limit: int) -> list[tuple[int, ...]] | None:
        self.walks += 1
        return super().walk(walk, limit)


def letters_first(v: TokenVocab, allowed: list[int], rng: random.Random) -> int:
    """As a model inside a string mostly does: a plain word piece where one is allowed."""
    plain = [t for t in allowed if v.pieces[t].strip().isalpha()]
    return rng.choice(plain or allowed)


@pytest.mark.parametrize("chooser", ["random", "letters first"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_kept_walks_decide_as_fresh_walks(spec: str, chooser: str) -> None:
    """Rows that pick allowed tokens (any, or plain word pieces first) under small budgets: the closer that
    keeps its way out takes the same token and measures the same distance as walking afresh, at every
    step, and walks less."""
    v = vocab("v11")
    constrainer = Constrainer(v)
    factory = constrainer.factory(SPECS[spec])
    assert factory is not None
    shortest = constrainer.shortest(SPECS[spec])
    assert shortest is not None
    kept = 0
    policy, reference_policy = CountedWalks(v), CountedWalks(v)
    for seed in range(24):
        rng, budget = random.Random(seed), shortest + seed
        ours, theirs = factory(), factory()
        closer, reference = Closer(policy), WalkEveryTime(reference_policy)
        for used in range(budget):
            allowed = ours.allowed().nonzero().view(-1).tolist()  # type: ignore[attr-defined]
            token = rng.choice(allowed) if chooser == "random" else letters_first(v, allowed, rng)
            kept += closer.path is not None
            mine = closer.settle(ours.matcher, token, budget - used)
            assert mine == reference.settle(theirs.matcher, token, budget - used)
            assert closer.last == reference.last
            if mine == v.eos_id:
                break
            assert ours.matcher.consume_token(mine) and theirs.matcher.consume_token(mine)
        else:
            raise AssertionError(f"seed {seed}: no EOS within {budget} tokens")
    assert kept > 0, "the cases must use kept walks"
    assert policy.walks < reference_policy.walks
