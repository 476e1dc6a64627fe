"""Fixtures of the model-level tests: the tiny model's prompt builder and log-mel, built once a module."""

from __future__ import annotations

import pytest

from app.model.compute.features import LogMel
from app.model.compute.loader import LoadedModel
from app.model.text.prompts import Prompter


@pytest.fixture(scope="module")
def prompter(loaded: LoadedModel) -> Prompter:
    return Prompter(loaded.processor, "tiny")


@pytest.fixture(scope="module")
def log_mel(loaded: LoadedModel) -> LogMel:
    return LogMel(loaded.processor.feature_extractor, 3000)
