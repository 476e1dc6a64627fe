"""The output projection: one row is `lm_head` bit for bit; 2-8 rows on a CPU in float32 may go weight-major
(app/model/compute/generate.py: measured at load; forced here) and stay within rounding of `lm_head`, with the same
argmax wherever it is decided."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.model.compute.features import LogMel
from app.model.compute.generate import WEIGHT_MAJOR_ROWS, BatchGenerator, weight_major_pays
from app.model.compute.loader import LoadedModel, load_model
from tests.support.server import make_settings


@pytest.fixture(scope="module")
def gen(loaded: LoadedModel) -> BatchGenerator:
    log_mel = LogMel(loaded.processor.feature_extractor, 3000)
    return BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel, weight_major=True)


@pytest.mark.parametrize("rows", [1, 2, 4, WEIGHT_MAJOR_ROWS, WEIGHT_MAJOR_ROWS + 1, 32])
def test_projection_matches_lm_head(gen: BatchGenerator, rows: int) -> None:
    assert gen.weight_major  # asked for, and the tiny model loads in float32 on a CPU
    hidden = torch.randn(rows, gen.model.lm_head.in_features, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        expected = gen.model.lm_head(hidden).float()
        got = gen.project(hidden)
    assert got.shape == expected.shape == (rows, gen.model.lm_head.out_features)
    if rows == 1 or rows > WEIGHT_MAJOR_ROWS:
        assert torch.equal(got, expected)  # the same call
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        top2 = expected.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert decided.sum() >= rows // 2
        assert torch.equal(got.argmax(-1)[decided], expected.argmax(-1)[decided])


def test_bfloat16_keeps_lm_head(tiny_dir: Path, loaded: LoadedModel) -> None:
    """bfloat16's near-ties are one step apart and its kernels differ between CPUs: no weight-major there."""
    model = load_model(make_settings(tiny_dir, dtype="bfloat16")).model
    gen = BatchGenerator(
        model, pad_token_id=11, log_mel=LogMel(loaded.processor.feature_extractor, 3000), weight_major=True
    )
    assert not gen.weight_major and not weight_major_pays(model.lm_head.weight)
    hidden = torch.randn(4, model.lm_head.in_features).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(gen.project(hidden), model.lm_head(hidden).float())


def test_weight_major_is_measured_on_a_cpu_float32_weight(loaded: LoadedModel) -> None:
    """Which projection pays depends on the CPU's kernels: measured at load, a yes or no; never on bfloat16."""
    weight = loaded.model.lm_head.weight
    assert isinstance(weight_major_pays(weight), bool)
    assert not weight_major_pays(weight.to(torch.bfloat16))
    log_mel = LogMel(loaded.processor.feature_extractor, 3000)
    assert not BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel, weight_major=False).weight_major
