"""The batched sampler draws from the right distribution: chi-square over small known distributions, exact
temperature, top_p / top_k / min_p boundaries, a flat 131,072-token distribution (the exact fallback),
penalties, grammar masks, and seeded rows that draw the same alone and in any batch."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from app.model.compute.masks import unpack, unpack_by_table
from app.model.compute.row import Row
from app.model.compute.sampling import TIERS, Sampler, sample
from app.model.compute.slots import CachePlan, CacheShape, SlotCache
from app.model.text.constrained import Constrainer
from app.model.values import FunctionSpec, OutputSpec
from app.types import SamplingParams
from tests.support.tekken_vocab import vocab

PROBS = [0.5, 0.25, 0.125, 0.0625, 0.0625]
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}
"""Chi-square critical values at p = 0.001: a correct sampler fails 1 run in 1,000 (the seeds are fixed,
so the test itself is deterministic)."""


def draws(probs: list[float], n: int, **params: Any) -> Counter[int]:
    """n draws: one step of n seeded rows over logits log(probs), permuted so order cannot matter."""
    perm = [3, 0, 4, 1, 2][: len(probs)] if len(probs) == 5 else list(range(len(probs)))
    logits = torch.log(torch.tensor([probs[p] for p in perm], dtype=torch.float32)).repeat(n, 1)
    rows = [Row([1], [], SamplingParams(seed=i, **{"temperature": 1.0, **params})) for i in range(n)]
    return Counter(perm[t] for t in sample(logits, rows))  # type: ignore[index]


def chi2(counts: Counter[int], expected: dict[int, float]) -> float:
    n = sum(counts.values())
    assert set(counts) <= set(expected), f"drew tokens outside the kept set: {set(counts) - set(expected)}"
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in expected.items())


def renormalised(keep: list[int], probs: list[float] = PROBS) -> dict[int, float]:
    total = sum(probs[t] for t in keep)
    return {t: probs[t] / total for t in keep}


def test_plain_sampling_matches_the_distribution() -> None:
    counts = draws(PROBS, 8000)
    assert chi2(counts, dict(enumerate(PROBS))) < CHI2_999[4]


def test_temperature_sharpens_as_softmax_of_logits_over_t() -> None:
    expected = torch.softmax(torch.log(torch.tensor(PROBS)) / 0.5, -1).tolist()
    counts = draws(PROBS, 8000, temperature=0.5)
    assert chi2(counts, dict(enumerate(expected))) < CHI2_999[4]


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"top_p": 0.7499}, [0, 1]),  # the mass before token 2 is 0.75: it is cut below, kept above
        ({"top_p": 0.7501}, [0, 1, 2]),
        ({"top_p": 0.01}, [0]),
        ({"top_k": 2}, [0, 1]),
        ({"top_k": 1}, [0]),
        ({"min_p": 0.24}, [0, 1, 2]),  # threshold 0.12: 0.125 stays, 0.0625 goes
        ({"min_p": 0.26}, [0, 1]),  # threshold 0.13: 0.125 goes
        ({"min_p": 0.51}, [0]),  # threshold 0.255: 0.25 goes
        ({"top_k": 3, "top_p": 0.8}, [0, 1]),  # top_p over top_k's renormalised mass: 0.5/0.875, 0.25/0.875
        ({"min_p": 0.2, "top_p": 0.86}, [0, 1, 2]),
    ],
    ids=str,
)
def test_truncation_boundaries_are_exact(params: dict[str, float], keep: list[int]) -> None:
    counts = draws(PROBS, 4000, **params)
    assert set(counts) == set(keep)
    if len(keep) > 1:
        assert chi2(counts, renormalised(keep)) < CHI2_999[len(keep) - 1]


def test_a_flat_131k_distribution_takes_the_exact_path_past_the_candidates() -> None:
    """top_p 0.5 of a nearly flat distribution over 131,072 tokens keeps ~65,000 of them, far more than
    every tier of candidates; the draws must still come from exactly that nucleus, and spread over it."""
    vocab_size = 131_072
    logits = (-torch.arange(vocab_size, dtype=torch.float32) * 1e-5).repeat(64, 1)
    probs = torch.softmax(logits[0].double(), -1)
    nucleus = int(((probs.cumsum(0) - probs) < 0.5).sum())
    rows = [Row([1], [], SamplingParams(temperature=1.0, top_p=0.5, seed=i)) for i in range(64)]
    tokens = sample(logits, rows)
    assert all(isinstance(t, int) and 0 <= t < nucleus for t in tokens), (nucleus, tokens)
    beyond = sum(int(t) >= TIERS[-1] for t in tokens)  # type: ignore[call-overload]
    assert beyond > 48  # most draws lie beyond every tier of candidates: the full sort drew them


def test_greedy_rows_are_exact_argmax_beside_sampled_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 131_072, generator=generator) * 4
    rows = [Row([1], [], SamplingParams(temperature=0.0 if i % 2 else 0.8, top_p=0.9, seed=i)) for i in range(12)]
    tokens = sample(logits, rows)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in range(1, 12, 2)] == [argmax[i] for i in range(1, 12, 2)]


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randn(9, 131_072, generator=generator) * 2 for _ in range(6)]
    params = [
        SamplingParams(temperature=0.7, top_p=0.9, seed=5),
        SamplingParams(temperature=1.0, seed=6),
        SamplingParams(temperature=0.4, top_k=40, min_p=0.05, seed=7),
    ]

    def run(batch: list[int], target: int) -> list[int]:
        rows = {i: Row([1], [], params[i % 3] if i < 3 else SamplingParams(temperature=1.0)) for i in batch}
        out = []
        for logits in steps:
            tokens = sample(logits[batch], [rows[i] for i in batch])
            out.append(int(tokens[batch.index(target)]))  # type: ignore[arg-type]
        return out

    for target in range(3):
        alone = run([target], target)
        assert run(list(range(9)), target) == alone
        assert run([8, 3, target, 6], target) == alone
    assert len(set(run([0], 0))) > 1  # the draws are not all the argmax: the test could fail


def test_presence_and_frequency_penalties_subtract_per_count() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.5, 0.0]]).repeat(3, 1)
    rows = [
        Row([1], [], SamplingParams(presence_penalty=1.5), generated=[0, 0]),  # 5 - 1.5 = 3.5 < 4
        Row([1], [], SamplingParams(frequency_penalty=0.8), generated=[0, 0, 1]),  # 5 - 1.6, 4 - 0.8
        Row([1], [], SamplingParams(), generated=[0, 0]),
    ]
    assert sample(logits, rows) == [1, 2, 0]
    assert torch.equal(logits[0], torch.tensor([5.0, 4.0, 3.5, 0.0]))  # the caller's logits are untouched


def _constraints(count: int) -> list[Any]:
    v = vocab("v11")
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    factory = Constrainer(v).factory(OutputSpec((FunctionSpec("get_weather", weather),), "required"))
    assert factory is not None
    return [factory() for _ in range(count)]


def test_masks_of_a_batch_are_applied_per_row_with_and_without_prefetch() -> None:
    """Constrained and free rows in one batch: each constrained row only ever draws what its grammar
    allows (checked against the row's own mask), free rows are untouched, prefetching changes nothing."""
    v = vocab("v11")
    runs = []
    for prefetch in (False, True):
        sampler = Sampler()
        rows = [Row([1], [], SamplingParams(temperature=1.0, seed=i)) for i in range(6)]
        for row, constraint in zip(rows[::2], _constraints(3), strict=True):
            row.constraint = constraint
        generator = torch.Generator().manual_seed(2)
        for _ in range(12):
            logits = torch.randn(6, v.size, generator=generator)
            allowed = [r.constraint.allowed() if r.constraint is not None else None for r in rows]
            if prefetch:
                sampler.prefetch(rows)
            tokens = sampler.sample(logits, rows)
            for token, mask, row in zip(tokens, allowed, rows, strict=True):
                assert isinstance(token, int)
                assert mask is None or mask[token], "a constrained row drew a token its grammar refuses"
                row.generated.append(token)
        runs.append([r.generated for r in rows])
    assert runs[0] == runs[1]
    assert runs[0][0][0] == v.tool_calls_id  # the forced call starts with [TOOL_CALLS]


def test_a_stale_prefetch_is_never_used() -> None:
    """A mask filled before a row took another token describes the old state: it is refilled."""
    v = vocab("v11")
    sampler = Sampler()
    row = Row([1], [], SamplingParams(), constraint=_constraints(1)[0])
    sampler.prefetch([row])
    first = sampler.sample(torch.zeros(1, v.size), [row])[0]  # [TOOL_CALLS], forced
    row.generated.append(first)  # type: ignore[arg-type]
    sampler.prefetch([row])
    assert sampler._pending is not None
    sampler._pending.result()  # a matcher is not to be moved while a fill reads it ("Already borrowed")
    row.constraint.advance(v.encode("get")[0])  # type: ignore[union-attr]
    row.generated.append(v.encode("get")[0])
    expected = row.constraint.allowed()  # type: ignore[union-attr]
    token = sampler.sample(torch.randn(1, v.size), [row])[0]
    assert isinstance(token, int) and expected[token]


def test_both_unpackings_of_a_bitmask_agree() -> None:
    """numpy's (CPU models) and the table lookup (GPU models) read bit j of word w as token 32w + j."""
    bits = torch.randint(-(2**31), 2**31 - 1, (5, 9), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    bits[0, 0] = 0b101  # tokens 0 and 2
    expected = unpack(bits, 9 * 32)
    assert torch.equal(unpack_by_table(bits), expected)
    assert expected[0, :4].tolist() == [True, False, True, False]
    assert unpack(bits, 300).shape == (5, 300) and not unpack(bits, 300)[:, 288:].any()


class _DevicesMustMatch(TorchFunctionMode):
    """CUDA's rule, enforced on CPU: index_select's index must live on the indexed tensor's device."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        indexing = (torch.index_select, torch.Tensor.index_select, torch.Tensor.index_copy_)
        if func in indexing and args[0].device != args[2].device:
            raise RuntimeError(f"index on {args[2].device}, tensor on {args[0].device}")
        return func(*args, **(kwargs or {}))


def test_slot_copies_index_each_layers_cache_on_its_device() -> None:
    """A cache spread over two devices (layer 0 on CPU, layer 1 on 'meta'), as `--device auto` spreads a
    model over GPUs: a copy between slots indexes each layer with an index on that layer's device."""
    shape = CacheShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)
    cache = SlotCache(shape, CachePlan(slots=3, max_len=8), [torch.device("cpu"), torch.device("meta")])
    cache.ready(8, 4)
    cache.keys[0][0, :, :5] = 1.0
    with _DevicesMustMatch():
        cache.copy([0], [2], 5)
    assert [k.device.type for k in cache.keys] == ["cpu", "meta"]
    assert bool((cache.keys[0][2, :, :5] == 1.0).all()) and bool((cache.keys[0][2, :, 5:] == 0.0).all())


def test_chi_square_critical_values_are_what_the_tests_assume() -> None:
    """Wilson-Hilferty approximation of the chi-square quantile, so a typo in the table cannot hide."""
    z = 3.0902  # the standard normal's 0.999 quantile
    for df, value in CHI2_999.items():
        approx = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
        assert abs(approx - value) / value < 0.08, df


def test_draws_invert_a_float64_running_sum() -> None:
    """The CDF a draw inverts is float64 (`sampling._cdf`): CUDA's one-row scan sums as a tree, and a masked
    token's one-ulp step in float32 would be a chance in about 10^4 a draw of taking a refused token."""
    from app.model.compute.sampling import _cdf, _invert

    weights = torch.tensor([[0.25, 0.0, 0.5, 0.0, 0.25]])
    cdf = _cdf(weights)
    assert cdf.dtype == torch.float64 and torch.equal(cdf[0, 1], cdf[0, 0]) and torch.equal(cdf[0, 3], cdf[0, 2])
    picks = [
        int(_invert(cdf, torch.tensor([[u]], dtype=torch.float64))) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999)
    ]
    assert picks == [0, 0, 2, 2, 4, 4]
