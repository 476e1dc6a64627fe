"""The fast log-mel gives `WhisperFeatureExtractor`'s features, within rounding, for every length."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from app.model.compute.features import LogMel
from app.model.compute.loader import LoadedModel
from tests.support.mel_checks import assert_mel_close


@pytest.fixture(scope="module")
def log_mel(loaded: LoadedModel) -> LogMel:
    return LogMel(loaded.processor.feature_extractor, 3000)


# Lengths around every boundary of the trimmed STFT (window 400, hop 160, 30 s chunks), silence,
# clipping-level audio, and random lengths up to three chunks.
_EDGE_LENGTHS = [1, 199, 200, 201, 399, 400, 401, 560, 561, 16_000, 479_599, 479_600, 479_601, 480_000, 480_001]
_EDGE_LENGTHS += [480_400, 959_999, 1_439_700] + [int(n) for n in np.random.default_rng(7).integers(1, 1_500_000, 12)]


@pytest.mark.parametrize("length", _EDGE_LENGTHS)
def test_log_mel_equals_the_feature_extractor(loaded: LoadedModel, log_mel: LogMel, length: int) -> None:
    """The fast log-mel skips the FFTs of the zero padding; it must give the extractor's values within
    rounding, whether the audio comes bare or already padded with zeros (as mistral-common hands it over)."""
    rng = np.random.default_rng(length)
    audio = (rng.standard_normal(length) * rng.uniform(1e-3, 1.0)).astype(np.float32)
    audio[-min(length, 7) :] = 0.0  # trailing zeros that are part of the audio
    ref = loaded.processor.feature_extractor(
        audio, sampling_rate=16000, padding=True, truncation=False, pad_to_multiple_of=480_000, return_tensors="pt"
    )["input_features"]
    chunks = -(-length // 480_000)
    for given in (audio, np.concatenate([audio, np.zeros(chunks * 480_000 - length, np.float32)])):
        ours = log_mel(given)
        assert ours.shape == (chunks, 128, 3000)
        assert_mel_close(ours.transpose(0, 1).reshape(128, -1), ref[0])


def test_log_mel_of_silence_and_full_scale(log_mel: LogMel) -> None:
    for audio in (np.zeros(16_000, np.float32), np.ones(16_000, np.float32), -np.ones(500_000, np.float32)):
        assert_mel_close(log_mel(audio), log_mel._reference(audio).reshape(128, -1, 3000).transpose(0, 1))


def test_log_mel_of_a_batch_equals_each_audio_alone(loaded: LoadedModel, log_mel: LogMel) -> None:
    """The worker transforms a whole batch at once: mixed lengths and chunk counts, silence, and
    audio ending within a window of its padded end (which sees its own reflection) all stay within
    rounding of the extractor, and equal to each audio alone (the same calls on the same shapes)."""
    rng = np.random.default_rng(3)
    lengths = [176_000, 1, 479_900, 720_000, 16_000, 960_000, 479_999, 300_000]
    audios = [(rng.standard_normal(n) * 0.2).astype(np.float32) for n in lengths] + [np.zeros(480_000, np.float32)]
    extractor = loaded.processor.feature_extractor
    kwargs: dict[str, Any] = {"padding": True, "truncation": False, "pad_to_multiple_of": 480_000}
    ref = [extractor(a, sampling_rate=16000, return_tensors="pt", **kwargs)["input_features"][0] for a in audios]
    expected = torch.cat([r.reshape(128, -1, 3000).transpose(0, 1) for r in ref])
    batch = log_mel.batch(audios)
    assert_mel_close(batch, expected)
    assert torch.equal(batch, torch.cat([log_mel(a) for a in audios]))
