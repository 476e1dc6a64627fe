"""Shared fixtures: one tiny model built and loaded per session, real servers on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from app.config import TINY_REALTIME_MODEL, Settings
from app.model.compute.loader import LoadedModel, load_model
from tests.support.server import RunningServer, make_settings, serve
from tests.support.speech_layout import Layout, make_layout

# Property tests explore a fixed set of examples: CI must not turn red on a new random draw.
hypothesis_settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis_settings.load_profile("deterministic")


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come only from what a test passes, never from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("VOXTRAL_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("voxtral-cache")


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path) -> LoadedModel:
    return load_model(make_settings(tiny_dir))


@pytest.fixture(scope="session")
def realtime_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny Voxtral Realtime model (`--model tiny-realtime`), built and loaded once; each server or engine
    over it allocates its own stream caches."""
    return load_model(make_settings(tmp_path_factory.mktemp("rt"), model=TINY_REALTIME_MODEL))


@pytest.fixture(scope="module")
def layout() -> Layout:
    """The 23 s file of speech, silences and a tail (tests/support/speech_layout.py), for chunking tests."""
    return make_layout()


@pytest.fixture(scope="session")
def server(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, max_batch_size=16) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Any:
    return server.client()


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


@pytest.fixture(scope="session")
def full_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the real checkpoints' 131,072-token vocabulary, built once (about 8 s, 75 MB)."""
    from app.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("voxtral-full-vocab"), full_vocab=True)


@pytest.fixture(scope="session")
def full_vocab(full_vocab_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(full_vocab_dir)))
