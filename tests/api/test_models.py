"""The names a server answers to: --served-model-name replaces the --model value (as in vLLM), aliases add to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import openai
import pytest
from websockets.sync.client import connect

from app.api.context import RANDOM_WEIGHTS_HEADER
from app.model.compute.loader import LoadedModel
from tests.support.server import AUDIO, serve


def test_served_model_name_replaces_the_model_value_and_aliases_add_to_it(loaded: LoadedModel, tiny_dir: Path) -> None:
    with serve(loaded, tiny_dir, served_model_name="voxtral-mini", model_aliases=["whisper-1"]) as server:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["voxtral-mini", "whisper-1"]
        for name in ("voxtral-mini", "whisper-1"):
            with (AUDIO / "jfk.wav").open("rb") as audio:
                assert client.audio.transcriptions.create(model=name, file=audio).text is not None
        with pytest.raises(openai.NotFoundError) as unknown:
            client.models.retrieve("tiny")
        assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError) as refused, (AUDIO / "jfk.wav").open("rb") as audio:
            client.audio.transcriptions.create(model="tiny", file=audio)
        assert "voxtral-mini" in refused.value.message


def test_answers_of_random_weights_say_so_in_a_header(loaded: LoadedModel, tiny_dir: Path) -> None:
    assert loaded.random_weights  # the tiny model: random by construction
    real = dataclasses.replace(loaded, random_weights=False)  # the same checkpoint, as a real one would load
    for model, marked in ((loaded, "true"), (real, None)):
        with serve(model, tiny_dir) as server, server.http() as http:
            assert http.get("/v1/models").headers.get(RANDOM_WEIGHTS_HEADER) == marked
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert http.post("/v1/chat/completions", json=chat).headers.get(RANDOM_WEIGHTS_HEADER) == marked
            assert RANDOM_WEIGHTS_HEADER not in http.get("/health").headers  # probes are not answers
            with connect(server.base_url.replace("http", "ws") + "/v1/realtime?intent=transcription") as ws:
                assert ws.response.headers.get(RANDOM_WEIGHTS_HEADER) == marked
