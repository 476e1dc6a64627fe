"""Log-probs from a per-row log-normaliser equal a float64 `log_softmax` of the same logits at the real
vocabulary size: ordinary rows, rows whose unshifted exponentials overflow or underflow float32 (summed again
shifted), through the sampler's one transfer, for greedy and sampled rows, with and without alternatives."""

from __future__ import annotations

import pytest
import torch

from app.model.compute.generate import Row
from app.model.compute.logprobs import SAFE_SUM, log_normalizers, ranked
from app.model.compute.sampling import Sampler
from app.types import Sampled, SamplingParams

VOCAB = 131_072
TOL = 1e-4
"""float32 logits, float32 exponentials summed by torch, against float64: 1e-6 seen for logits of scale 4; a
wrong row is off by > 1, an overflowed sum by inf."""


def _logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(6, VOCAB, generator=g) * 4
    scores[1] += 90  # every unshifted exponential overflows
    scores[2] -= 120  # every one underflows
    scores[3, 1234] = 85.0  # one overflows alone
    scores[4] -= 60  # near the edge: the sum is below SAFE_SUM or its precision holds
    scores[5] = scores[5] * 0.01  # nearly flat
    return scores.contiguous()


def test_normalisers_equal_float64_logsumexp_on_every_kind_of_row() -> None:
    scores = _logits()
    expected = torch.logsumexp(scores.double(), dim=-1)
    found = log_normalizers(scores)
    assert found.dtype == torch.float64
    assert torch.allclose(found, expected, rtol=0, atol=TOL), (found - expected).abs().max()
    assert log_normalizers(scores.bfloat16()).sub(torch.logsumexp(scores.bfloat16().double(), -1)).abs().max() < TOL
    assert SAFE_SUM > 0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(logprobs=5),
        SamplingParams(logprobs=0),  # greedy, no alternatives: its token is still the plain argmax
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, logprobs=2),
        SamplingParams(temperature=0.8, seed=4, logprobs=0),
    ],
)
def test_sampler_logprobs_are_the_log_softmax_of_the_logits(params: SamplingParams) -> None:
    scores = _logits()
    reference = torch.log_softmax(scores.double(), dim=-1)
    rows = [Row([1], [], params) for _ in range(scores.shape[0])]
    step = Sampler().step(scores, rows)
    for i, got in enumerate(step):
        assert isinstance(got, Sampled) and got.logprob is not None
        if params.temperature == 0:
            assert got.token == int(scores[i].argmax())
        assert abs(got.logprob.logprob - float(reference[i, got.token])) < TOL
        asked = params.logprobs or 0
        assert [t for t, _ in got.logprob.top] == reference[i].topk(asked).indices.tolist()
        for token, value in got.logprob.top:
            assert abs(value - float(reference[i, token])) < TOL


def test_a_near_certain_token_never_gets_a_logprob_above_zero() -> None:
    """Unshifted float32 exponentials are within an ulp: a dominant logit may exceed its row's normaliser by
    ~1e-7, which would read as a probability above 1; OpenAI never sends one."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(64, VOCAB, generator=g)
    scores[torch.arange(64), torch.arange(64) * 17] = torch.linspace(5, 45, 64)
    step = Sampler().step(scores, [Row([1], [], SamplingParams(logprobs=3)) for _ in range(64)])
    for i, got in enumerate(step):
        assert isinstance(got, Sampled) and got.logprob is not None and got.token == i * 17
        assert got.logprob.logprob <= 0.0 and all(value <= 0.0 for _, value in got.logprob.top)


TIED = [[5, 900, 3000], list(range(100, 4000, 300)), [0, 1], []]
"""Where each row of `_tied` holds its maximum: three far apart, 13 (more than any `top_logprobs` here), the
first two, and (empty) everywhere: a constant row."""


def _tied(dtype: torch.dtype) -> torch.Tensor:
    """Rows with exact ties at their maximum (`TIED`), values on the bfloat16 grid so both dtypes tie alike."""
    g = torch.Generator().manual_seed(5)
    scores = (torch.randn(len(TIED), 4096, generator=g) * 2).bfloat16().float()
    for row, where in enumerate(TIED):
        if where:
            scores[row, where] = 9.0
        else:
            scores[row] = 1.5
    return scores.to(dtype).contiguous()


def _ties_reversed(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A `topk` that gives equal values highest index first: the order CUDA's may give, which nothing promises."""
    flipped = torch.arange(scores.shape[1] - 1, -1, -1)
    values, order = torch.sort(scores[:, flipped], dim=-1, descending=True, stable=True)
    return values[:, :k].contiguous(), flipped[order[:, :k]].contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("asked", [None, 0, 1, 5])
def test_a_greedy_token_is_the_lowest_index_of_its_maximum_whatever_topk_gives_ties(
    dtype: torch.dtype, asked: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue-33 invariant: with or without log-probs, and with a `topk` that ranks ties highest index
    first, a greedy row takes the lowest index holding its maximum, and its first alternative is that token."""
    monkeypatch.setattr("app.model.compute.logprobs.topk", _ties_reversed)
    scores = _tied(dtype)
    step = Sampler().step(scores, [Row([1], [], SamplingParams(logprobs=asked)) for _ in TIED])
    for i, got in enumerate(step):
        assert isinstance(got, Sampled)
        assert got.token == int((scores[i] == scores[i].max()).nonzero()[0]) == (TIED[i] or [0])[0]
        if asked is None:
            assert got.logprob is None
            continue
        assert got.logprob is not None and len(got.logprob.top) == asked
        expected = float(torch.log_softmax(scores[i].double(), -1)[got.token])
        assert abs(got.logprob.logprob - expected) < TOL
        if asked:
            assert got.logprob.top[0] == (got.token, got.logprob.logprob)
            tied = [t for t, value in got.logprob.top if value == got.logprob.logprob]
            assert tied == sorted(tied)  # one order among equal values: by id, whatever topk gave


def test_ranked_puts_ties_in_one_order_and_the_rows_token_in_them() -> None:
    # topk gave a tie highest index first: by id, the row's token first among equals
    assert ranked([3.0, 3.0, 1.0], [9, 4, 2], 9, 3.0) == [(3.0, 9), (3.0, 4), (1.0, 2)]
    assert ranked([3.0, 3.0, 1.0], [9, 4, 2], 2, 1.0) == [(3.0, 4), (3.0, 9), (1.0, 2)]
    # more ties than alternatives and the token not among them: it takes the last tied place
    assert ranked([3.0, 3.0], [9, 4], 1, 3.0) == [(3.0, 1), (3.0, 4)]
    # a token below the alternatives is not one of them
    assert ranked([3.0, 2.0], [9, 4], 1, 1.0) == [(3.0, 9), (2.0, 4)]
